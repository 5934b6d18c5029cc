"""§9 long-prompt throughput (Qwen3-0.6B, 128 prompts of 4k-8k tokens, 256 out) and where its
GPU time goes.

    python benchmarks/long_prompts_bench.py [--kv-cache-dtype auto|fp8] [--prefill-attention triton|auto]
                                            [--profile] [--label NAME] [--llm-kwargs JSON]

The workload is the one of ``../shared/vllm/sbs_bench.py`` task ``qwen3_long_tput`` (same prompts:
``random.seed(0)``, same sampling). Prints and writes ``$OUT/long-<label>.json``: wall seconds,
output tokens per second and, with ``--profile``, the GPU time per kernel (``torch.profiler``,
the whole run on fresh prompts of the same length distribution: kernel sums are exact, the wall
under the profiler is not) grouped into decode attention, extend (prefill) attention, GEMMs and
the rest. The profiled run is a second run after
the timed one, so the timed number is never taken under the profiler."""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict

import torch

from miniinfer import LLM, SamplingParams
from miniinfer.bench.common import timed_generate

CATEGORIES = (  # first match wins; names as the profiler shows Triton / cuBLAS kernels
    ("decode_attention", ("_decode_stage",)),
    ("extend_attention", ("_extend", "prefix_merge", "_prefix")),
    ("cudnn_sdpa", ("cudnn", "fmha", "flash")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "_gemv")),
    ("kv_store_rope", ("rope", "kv_store", "store_kv")),
    ("norm", ("norm",)),
    ("sampling", ("sample", "topk", "softmax", "argmax", "gumbel", "exponential")),
)


def workload(seed: int = 0) -> list[list[int]]:
    random.seed(seed)
    return [[random.randint(0, 10000) for _ in range(random.randint(4000, 8000))] for _ in range(128)]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def kernel_table(prof) -> tuple[dict[str, float], list[dict]]:
    """Per-category and per-kernel device milliseconds of a finished profile."""
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = per_kernel[ev.name]
        k[0] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
        k[1] += 1
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[category(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:30]
    return dict(cats), [{"kernel": n[:160], "ms": round(ms, 2), "calls": c, "category": category(n)}
                        for n, (ms, c) in top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--prefill-attention", default="triton")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--label", default=None)
    ap.add_argument("--llm-kwargs", default="{}")
    a = ap.parse_args()
    label = a.label or f"{a.kv_cache_dtype}-{a.prefill_attention}"
    kw = dict(load_format="dummy", dtype="bfloat16", max_model_len=32768, gpu_memory_utilization=0.85,
              seed=0, progress=False, kv_cache_dtype=a.kv_cache_dtype, prefill_attention=a.prefill_attention)
    kw.update(json.loads(a.llm_kwargs))
    t0 = time.perf_counter()
    llm = LLM(a.model, **kw)
    startup = time.perf_counter() - t0
    prompts = workload()
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=256)
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)
    _, wall, out_tokens = timed_generate(llm, prompts, params)
    result = {"label": label, "llm_kwargs": {k: v for k, v in kw.items()}, "startup_s": round(startup, 2),
              "wall_s": round(wall, 3), "out_tok_s": round(out_tokens / wall, 1),
              "stats": {k: v for k, v in llm.engine.stats().items() if isinstance(v, (int, float))}
              if hasattr(llm, "engine") and hasattr(llm.engine, "stats") else {}}
    print(f"[{label}] wall {wall:.3f} s, {out_tokens / wall:.1f} out tok/s (startup {startup:.1f} s)", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        fresh = workload(1)  # other prompts: the timed run's are in the prefix cache now
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(fresh, params, use_tqdm=False)
            torch.cuda.synchronize()
        cats, top = kernel_table(prof)
        total = sum(cats.values())
        result["gpu_ms_by_category"] = {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
        result["gpu_ms_total"] = round(total, 1)
        result["top_kernels"] = top
        print(f"[{label}] GPU ms by category (total {total:.0f}):", json.dumps(result["gpu_ms_by_category"]))
        for row in top[:15]:
            print(f"  {row['ms']:9.1f} ms {row['calls']:7d}  {row['category']:16s} {row['kernel'][:90]}")
    out_dir = os.environ.get("OUT", "artifacts")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"long-{label}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
