"""One "rank" of the CPU test of ``kernels/allreduce_norm.py`` (``test_allreduce_norm.py``):
runs the Triton kernel under the interpreter (TRITON_INTERPRET=1) on CPU tensors that stand
for symmetric memory: every rank's buffers and signal pads are files in a shared folder
mapped by each process at its own addresses, as CUDA peer mappings are.

    python _allreduce_norm_rank.py RANK WORLD FOLDER ROWS HIDDEN REPS DTYPE

Op k uses allocation k % 2 (comm.py's ping-pong) and inputs seeded by k; ranks start each
op after a rank-dependent sleep, so the barrier has to hold the early ones back. Prints one
JSON line: per op the max |kernel - reference| of the normed output and of the residual, and
a checksum of the normed output (equal on every rank when the results are bit-identical).
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from miniinfer.kernels.allreduce_norm import allreduce_add_rms_norm_, allreduce_add_rms_norm_ref  # noqa: E402

PAD_SLOTS = 1024


def _shared(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=numel, dtype=dtype)


def main() -> None:
    rank, world, folder, rows, hidden, reps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                               int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    dtype = getattr(torch, sys.argv[7])
    keep, tables = [], []
    for j in range(2):  # two allocations, each with every rank's buffer and signal pad
        bufs = [_shared(f"{folder}/buf{j}_{r}", rows * hidden, dtype) for r in range(world)]
        pads = [_shared(f"{folder}/pad{j}_{r}", PAD_SLOTS, torch.int32) for r in range(world)]
        keep += bufs + pads
        tables.append((torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64),
                       torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)))
    weight = torch.randn(hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    ops = []
    for k in range(reps):
        g = torch.Generator().manual_seed(1000 + k)
        partials = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world)]
        residual = torch.randn(rows, hidden, generator=g).to(dtype)
        want_x, want_r = allreduce_add_rms_norm_ref(partials, residual, weight, 1e-6)
        x, r = partials[rank].clone(), residual.clone()
        time.sleep(0.03 * ((k + rank) % world))
        allreduce_add_rms_norm_(x, r, weight, 1e-6, *tables[k % 2], rank)
        ops.append({"dx": (x.float() - want_x.float()).abs().max().item(),
                    "dr": (r.float() - want_r.float()).abs().max().item(),
                    "sum": x.double().sum().item()})
    print(json.dumps({"rank": rank, "ops": ops}))


if __name__ == "__main__":
    main()
