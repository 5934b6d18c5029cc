"""Time per call of the C Q4_1 GEMM (``cpu_kernels.gemm``) on SmolLM2-135M shapes, fp32
activations vs int8 activations (``int8=True``), per kernel path, at M = 1 .. 128 rows.

    python benchmarks/cpu_gemm_bench.py [--isa avx512 avx2] [--m 1 2 4 8 16 32 128] [--json out.json]

Random Q4_1 weights (timing does not depend on values). Each cell: the fastest of repeated timed
batches after a warmup, in microseconds per call; ``x`` = fp32 time / int8 time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from miniinfer.kernels import cpu_kernels

SHAPES = {"o_proj 576x576": (576, 576), "kv 192x576": (192, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}


def q4_1_blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    nb = k // 32
    d = rng.uniform(0.002, 0.02, (n, nb)).astype(np.float16)
    m = (-8 * d.astype(np.float32)).astype(np.float16)
    b = np.empty((n, nb, 20), np.uint8)
    b[:, :, 0:2] = d.view(np.uint8).reshape(n, nb, 2)
    b[:, :, 2:4] = m.view(np.uint8).reshape(n, nb, 2)
    b[:, :, 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return torch.from_numpy(b.reshape(n, nb * 20))


def time_call(fn, min_time: float = 0.05, repeats: int = 7) -> float:
    """Seconds per call: the fastest of ``repeats`` batches of calls lasting ~min_time / repeats
    each (the minimum, not the median: robust to other processes on a shared machine)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time / repeats:
        fn()
        n += 1
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(max(1, n)):
            fn()
        samples.append((time.perf_counter() - t0) / max(1, n))
    return min(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", nargs="+", default=["avx512", "avx2"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 128])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="names from SHAPES")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timed batch")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results = []
    for isa in args.isa:
        if isa not in cpu_kernels.supported_isas():
            print(f"skip {isa}: not supported here")
            continue
        with cpu_kernels.use_isa(isa):
            print(f"\n== {isa} path (int8 kernel: {cpu_kernels.int8_kernel()}), us per call: fp32 / int8 (x speedup)")
            print(f"{'shape':>20} " + " ".join(f"{'M=' + str(m):>22}" for m in args.m))
            for name in args.shapes:
                n, k = SHAPES[name]
                packed = cpu_kernels.repack(q4_1_blocks(n, k), k)
                cells = []
                for m in args.m:
                    x = torch.randn(m, k)
                    t32 = time_call(lambda: cpu_kernels.gemm(x, packed, n, k), args.min_time)
                    t8 = time_call(lambda: cpu_kernels.gemm(x, packed, n, k, int8=True), args.min_time)
                    results.append({"isa": isa, "shape": name, "N": n, "K": k, "M": m,
                                    "fp32_us": t32 * 1e6, "int8_us": t8 * 1e6})
                    cells.append(f"{t32 * 1e6:8.1f}/{t8 * 1e6:7.1f} ({t32 / t8:4.2f}x)")
                print(f"{name:>20} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
