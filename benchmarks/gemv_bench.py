"""Decode GEMV (``kernels/gemv.py``) vs cuBLAS (``F.linear``) at M = 1..8 rows, on a CUDA GPU.

    python benchmarks/gemv_bench.py                 (writes $OUT/gemv-bench.json; ~1-2 min on an H200)
    python benchmarks/gemv_bench.py --sweep none    (skip the config sweep)

(a) copy bandwidth: best of 5 device-to-device copies of 1 GiB, GB/s of bytes read + written;
(b) Qwen2-7B (TP=1 and TP=2 shards) and Qwen2-0.5B linear shapes at M = 1, 2, 4, 8 in bf16:
    microseconds per call of F.linear and of gemv (default config), measured in a captured
    CUDA graph of >= 20 calls that rotate over weight copies totalling >= 256 MB (so the 50 MB
    L2 never holds the weight); GB/s = weight bytes / time; ratio = cuBLAS time / gemv time;
(c) a config sweep per shape at M = 1 and M = 4; ``best_configs`` lists the winners as
    ``TUNED`` table entries for ``miniinfer/kernels/gemv.py``;
plus a correctness check (max abs error vs an fp32 reference, gemv and cuBLAS).

    python benchmarks/gemv_bench.py --mode silu_mul (writes $OUT/gemv-silu-bench.json; ~1 min)

times the down projections at M = 1, 2 as the MLP runs them: the ``silu_and_mul`` kernel then
the GEMV, vs the GEMV with the SiLU-and-mul prologue (``act="silu_mul"``), default config then
a small tile sweep of the fused kernel; checks that both give the same bits.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from miniinfer.kernels.gemv import GemvConfig, gemv, gemv_config

SHAPES = [  # name, N (out features), K (in features)
    ("7b qkv", 4608, 3584), ("7b o", 3584, 3584), ("7b gate_up", 37888, 3584),
    ("7b down", 3584, 18944), ("7b lm_head", 152064, 3584),
    ("7b-tp2 qkv", 2304, 3584), ("7b-tp2 o", 3584, 1792), ("7b-tp2 gate_up", 18944, 3584),
    ("7b-tp2 down", 3584, 9472),
    ("0.5b qkv", 1152, 896), ("0.5b o", 896, 896), ("0.5b gate_up", 9728, 896),
    ("0.5b down", 896, 4864), ("0.5b lm_head", 151936, 896),
]
ROWS = (1, 2, 4, 8)
LAYERS = {"7b": 28, "7b-tp2": 28, "0.5b": 24}  # decoder layers (lm_head counted once)
MIN_ROTATION_BYTES = 256 << 20
DEVICE = "cuda"  # a module constant so the flow can be smoke-tested on CPU
# (block_n, block_k, num_warps, num_stages, use_dot) swept at M = 1 and M = 4
TILES_M1 = ([(bn, bk, 4, st, False) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for st in (1, 3)]
            + [(1, 2048, 4, 1, False), (1, 2048, 4, 3, False), (8, 1024, 8, 3, False),
               (16, 256, 4, 3, True), (16, 512, 4, 4, True)])
TILES_M4 = ([(bn, bk, 4, 3, True) for bn in (16, 32) for bk in (128, 256, 512)]
            + [(16, 256, 4, 4, True), (32, 128, 4, 4, True), (16, 512, 8, 3, True)])
SPLITS = (1, 2, 4, 8)


def copy_bandwidth() -> float:
    """GB/s (bytes read + written) of the best of 5 device-to-device 1 GiB copies."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e))
    del x, y
    return 2 * (1 << 30) / best / 1e6


def graph_us(calls: list[Callable[[], object]], min_ms: float = 15.0) -> float:
    """Microseconds per call of ``calls`` replayed in one CUDA graph (CUDA events)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, cuBLAS workspaces) off the capture
        calls[0]()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    graph.replay()
    e.record()
    torch.cuda.synchronize()
    reps = max(3, int(min_ms / max(s.elapsed_time(e), 1e-3)))
    s.record()
    for _ in range(reps):
        graph.replay()
    e.record()
    torch.cuda.synchronize()
    del graph
    return s.elapsed_time(e) * 1e3 / (reps * len(calls))


class Problem:
    """Weight copies of one [N, K] bf16 shape (>= MIN_ROTATION_BYTES in all) and x per M."""

    def __init__(self, N: int, K: int):
        self.N, self.K = N, K
        self.bytes = N * K * 2
        n = max(2, math.ceil(MIN_ROTATION_BYTES / self.bytes))
        base = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) / K ** 0.5
        self.weights = [base] + [base.clone() for _ in range(n - 1)]
        self.ncalls = max(20, n)

    def x(self, M: int) -> torch.Tensor:
        g = torch.Generator(device=DEVICE).manual_seed(M)
        return torch.randn(M, self.K, device=DEVICE, dtype=torch.bfloat16, generator=g)

    def time_cublas(self, M: int) -> float:
        x = self.x(M)
        return graph_us([lambda w=self.weights[i % len(self.weights)]: F.linear(x, w)
                         for i in range(self.ncalls)])

    def time_gemv(self, M: int, cfg: GemvConfig | None = None) -> float:
        x = self.x(M)
        out = torch.empty(M, self.N, device=DEVICE, dtype=torch.bfloat16)
        return graph_us([lambda w=self.weights[i % len(self.weights)]: gemv(x, w, out=out, config=cfg)
                         for i in range(self.ncalls)])

    def errors(self, M: int) -> dict:
        x, w = self.x(M), self.weights[0]
        ref = x.float() @ w.float().t()
        scale = ref.abs().max().item()
        e_g = (gemv(x, w).float() - ref).abs().max().item()
        e_c = (F.linear(x, w).float() - ref).abs().max().item()
        return dict(max_abs_err_gemv=e_g, max_abs_err_cublas=e_c, ref_max_abs=scale,
                    ok=e_g <= 1.6e-2 * scale + 1e-3)  # ~2 bf16 ulps of the largest output

    def free(self) -> None:
        self.weights.clear()


def sweep(p: Problem, M: int, deadline: float) -> list[dict]:
    """Tile configs (with the heuristic's split), then splits for the best tile; µs each."""
    tiles = TILES_M1 if M <= 2 else TILES_M4
    auto_split = gemv_config(M, p.N, p.K, torch.device(DEVICE)).split_k
    results = []

    def run(cfg: GemvConfig) -> None:
        if time.time() > deadline:
            return
        try:
            results.append(dict(config=cfg.__dict__, us=p.time_gemv(M, cfg)))
        except Exception as exc:  # e.g. out of shared memory / registers: record and go on
            results.append(dict(config=cfg.__dict__, error=repr(exc)[:200]))

    for bn, bk, warps, stages, dot in tiles:
        run(GemvConfig(bn, bk, auto_split, warps, stages, use_dot=dot))
    timed = [r for r in results if "us" in r]
    if timed:
        best = GemvConfig(**min(timed, key=lambda r: r["us"])["config"])
        for split in SPLITS:
            if split != best.split_k:
                run(GemvConfig(best.block_n, best.block_k, split, best.num_warps, best.num_stages, best.use_dot))
    return results


SILU_TILES = [(bn, bk, st) for bn in (4, 8) for bk in (512, 1024) for st in (1, 3)]  # fused sweep


def silu_mul_rows(deadline: float) -> list[dict]:
    """Per down-projection shape and M in (1, 2): µs of silu_and_mul + gemv (one pair per
    weight copy, in a CUDA graph) and of the fused gemv (default config, then SILU_TILES with
    the default split until ``deadline``), and whether the two agree bit for bit."""
    from miniinfer.kernels.activation import silu_and_mul

    rows = []
    for name, N, K in [s for s in SHAPES if s[0].endswith(" down")]:
        p = Problem(N, K)
        ws = [p.weights[i % len(p.weights)] for i in range(p.ncalls)]
        for M in (1, 2):
            g = torch.Generator(device=DEVICE).manual_seed(M)
            gate_up = torch.randn(M, 2 * K, device=DEVICE, dtype=torch.bfloat16, generator=g)
            h = torch.empty(M, K, device=DEVICE, dtype=torch.bfloat16)
            out = torch.empty(M, N, device=DEVICE, dtype=torch.bfloat16)

            def fused_us(cfg: GemvConfig | None = None) -> float:
                return graph_us([lambda w=w: gemv(gate_up, w, out=out, config=cfg, act="silu_mul") for w in ws])

            row = dict(shape=name, N=N, I=K, M=M,
                       unfused_us=graph_us([lambda w=w: gemv(silu_and_mul(gate_up, out=h), w, out=out) for w in ws]),
                       fused_us=fused_us(), bit_exact=torch.equal(gemv(gate_up, ws[0], act="silu_mul"),
                                                                  gemv(silu_and_mul(gate_up), ws[0])))
            split = gemv_config(M, N, K, torch.device(DEVICE)).split_k
            row["fused_sweep"] = [dict(config=cfg.__dict__, us=fused_us(cfg)) for cfg in
                                  (GemvConfig(bn, bk, split, 4, st) for bn, bk, st in SILU_TILES)
                                  if time.time() < deadline]
            rows.append(row)
            print(f"{name:16s} M={M} silu+gemv {row['unfused_us']:7.1f} us | fused {row['fused_us']:7.1f} us | "
                  f"best swept {min([r['us'] for r in row['fused_sweep']] or [math.nan]):7.1f} us | "
                  f"bit-exact {row['bit_exact']}", flush=True)
        p.free()
        torch.cuda.empty_cache()
    return rows


def step_estimates(rows: list[dict]) -> dict:
    """Per model and M: µs of one decode step's linears (layers x per-layer shapes + lm_head)."""
    est: dict = {}
    for r in rows:
        model, part = r["shape"].split()
        mult = 1 if part == "lm_head" else LAYERS[model]
        key = f"{model} M={r['M']}"
        e = est.setdefault(key, dict(cublas_us=0.0, gemv_us=0.0))
        e["cublas_us"] += mult * r["cublas_us"]
        e["gemv_us"] += mult * r["gemv_us"]
    for e in est.values():
        e["speedup"] = e["cublas_us"] / e["gemv_us"]
    return est


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", choices=("quick", "none"), default="quick")
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop sweeping after this many seconds")
    ap.add_argument("--mode", choices=("gemv", "silu_mul"), default="gemv",
                    help="silu_mul: the down projection's fused SiLU-and-mul prologue vs two kernels")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.time()
    torch.manual_seed(0)
    if args.mode == "silu_mul":
        rows = silu_mul_rows(t0 + args.budget_s)
        _write("gemv-silu-bench.json", dict(device=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
                                            command="python " + " ".join(sys.argv), rows=rows))
        return
    bw = copy_bandwidth()
    rows, checks, sweeps, best = [], [], {}, {}
    for name, N, K in SHAPES:
        p = Problem(N, K)
        for M in ROWS:
            tc, tg = p.time_cublas(M), p.time_gemv(M)
            cfg = gemv_config(M, N, K, torch.device(DEVICE))
            rows.append(dict(shape=name, N=N, K=K, M=M, cublas_us=tc, gemv_us=tg,
                             cublas_GBs=p.bytes / tc / 1e3, gemv_GBs=p.bytes / tg / 1e3,
                             ratio_cublas_over_gemv=tc / tg, config=cfg.__dict__))
            checks.append(dict(shape=name, M=M, **p.errors(M)))
            print(f"{name:16s} M={M} cuBLAS {tc:8.1f} us {p.bytes / tc / 1e3:6.0f} GB/s | gemv {tg:8.1f} us "
                  f"{p.bytes / tg / 1e3:6.0f} GB/s | x{tc / tg:.2f}", flush=True)
        if args.sweep != "none":
            for M in (1, 4):
                res = sweep(p, M, t0 + args.budget_s)
                sweeps[f"{name} M={M}"] = res
                timed = [r for r in res if "us" in r]
                if timed:
                    b = min(timed, key=lambda r: r["us"])
                    best[f"({N}, {K}, {M})"] = dict(config=b["config"], us=b["us"], GBs=p.bytes / b["us"] / 1e3)
                    print(f"  sweep M={M}: best {b['config']} {b['us']:.1f} us", flush=True)
        p.free()
        torch.cuda.empty_cache()
    ratios = {M: [r["ratio_cublas_over_gemv"] for r in rows if r["M"] == M] for M in ROWS}
    metrics = dict(
        copy_bandwidth_GBs=bw,
        geomean_ratio_cublas_over_gemv={f"M={M}": math.exp(sum(map(math.log, v)) / len(v)) for M, v in ratios.items()},
        step_linear_us=step_estimates(rows),
        correctness_ok=all(c["ok"] for c in checks),
        sweep_complete=args.sweep != "none" and time.time() < t0 + args.budget_s,
        wall_s=time.time() - t0,
    )
    result = dict(device=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
                  command="python " + " ".join(sys.argv), metrics=metrics,
                  details=dict(rows=rows, correctness=checks, best_configs=best, sweeps=sweeps,
                               torch=torch.__version__, triton=__import__("triton").__version__))
    print(json.dumps(metrics, indent=2))
    print("TUNED entries (paste into miniinfer/kernels/gemv.py):")
    for key, b in best.items():
        c = b["config"]
        print(f"    {key}: GemvConfig({', '.join(f'{k}={v!r}' for k, v in c.items())}),  # {b['GBs']:.0f} GB/s")
    _write("gemv-bench.json", result)


def _write(name: str, result: dict) -> None:
    """``result`` as JSON in $OUT (default ``artifacts/``)."""
    out_dir = os.environ.get("OUT", "artifacts")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
