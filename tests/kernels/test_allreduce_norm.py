"""``kernels/allreduce_norm.py`` (fused one-shot all-reduce + residual add + RMSNorm) on CPU:
the torch reference against the unfused math, and the Triton kernel itself under the
interpreter with 2 and 3 "ranks" (processes over shared files standing for symmetric
memory; see ``_allreduce_norm_rank.py``). The GPU test is ``tests/gpu/test_gpu_allreduce_norm.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

RANK_SCRIPT = os.path.join(os.path.dirname(__file__), "_allreduce_norm_rank.py")


def _run_ranks(tmp_path, world: int, rows: int, hidden: int, reps: int, dtype: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, RANK_SCRIPT, str(r), str(world), str(tmp_path), str(rows), str(hidden),
                               str(reps), dtype], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return sorted(outs, key=lambda o: o["rank"])


@pytest.mark.parametrize("world,rows,hidden,dtype", [(2, 3, 40, "float32"), (3, 2, 24, "float32"),
                                                     (2, 2, 32, "float16")])
def test_kernel_under_interpreter_matches_reference_on_every_rank(tmp_path, world, rows, hidden, dtype):
    reps = 5  # both allocations more than once: the signal pads must come back to rest each time
    outs = _run_ranks(tmp_path, world, rows, hidden, reps, dtype)
    tol = 1e-5 if dtype == "float32" else 2e-3 * 8
    for o in outs:
        for op in o["ops"]:
            assert op["dr"] == 0.0  # the residual: same rounding as the reference, exactly
            assert op["dx"] <= tol
    for k in range(reps):  # bit-identical on every rank (the same summation order everywhere)
        assert len({o["ops"][k]["sum"] for o in outs}) == 1
    for j in range(2):
        for r in range(world):
            pad = torch.from_file(f"{tmp_path}/pad{j}_{r}", shared=False, size=1024, dtype=torch.int32)
            assert int(pad.abs().sum()) == 0, "signal pads not back at rest"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_all_reduce_then_fused_add_rms_norm(dtype):
    """Two ranks: the fused math is exactly the unfused path's (sum rounded to the dtype, then
    the add + norm of ``kernels/norm.py``'s reference)."""
    from miniinfer.kernels.allreduce_norm import allreduce_add_rms_norm_ref
    from miniinfer.kernels.norm import fused_add_rms_norm_ref
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(5, 96, generator=g).to(dtype) for _ in range(2)]
    res = torch.randn(5, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    got = allreduce_add_rms_norm_ref(parts, res, w, 1e-6)
    want = fused_add_rms_norm_ref(parts[0] + parts[1], res, w, 1e-6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_fits_and_shape_errors():
    from miniinfer.kernels import allreduce_norm as arn
    cap = arn.MAX_ROWS * arn.MAX_HIDDEN
    assert arn.fits(torch.empty(1, 3584), cap, 2, 9216)
    assert arn.fits(torch.empty(arn.MAX_ROWS, 3584), cap, 2, 9216)
    assert not arn.fits(torch.empty(arn.MAX_ROWS + 1, 3584), cap, 2, 9216)
    assert not arn.fits(torch.empty(8, 8192 + 64), cap, 2, 9216)
    assert not arn.fits(torch.empty(64, 3584), cap, 8, 1024)  # too few signal slots
    assert not arn.fits(torch.empty(arn.MAX_ROWS, 3584), cap, 2, 1024)
    assert not arn.fits(torch.empty(4, 3584)[:, ::2], cap, 2, 9216)
    with pytest.raises(ValueError):
        arn.allreduce_add_rms_norm_(torch.empty(arn.MAX_ROWS + 1, 16), torch.empty(arn.MAX_ROWS + 1, 16),
                                    torch.empty(16), 1e-6,
                                    torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 0)


def test_compiles_for_sm90_with_system_scope_barrier():
    """The PTX (no GPU needed): release CAS to each peer before the acquire CAS on this rank's
    pad, both at system scope, after the copy into the buffer; 128-bit row accesses."""
    script = os.path.join(os.path.dirname(__file__), "_allreduce_norm_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["release"] >= 1 and got["acquire"] >= 1, got
    assert got["store_before_release"] and got["release_before_acquire"], got
    assert got["scalar_16bit_memops"] == 0, got
