"""Paged decode attention on the GPU: achieved KV bandwidth per shape and launch config.

    python benchmarks/kernel_bench.py          (writes $OUT/kernel-bench.json)
    python benchmarks/kernel_bench.py --long   (the §9 decode batch: 128 contexts of 4k-8k tokens,
                                                bf16 and fp8 caches, split counts; kernel-bench-long.json)

For each shape (batch, context, heads of a real model) it times the kernel with CUDA events
for a sweep of tile sizes / warps / pipeline stages, and reports GB/s of K+V read against the
card's copy bandwidth measured in the same run."""
from __future__ import annotations

import itertools
import json
import os
import sys

import torch

from miniinfer.bench.common import device_ms
from miniinfer.kernels.decode_attention import decode_split_config, paged_decode_attention

SHAPES = [  # name, batch, context, H, Hkv, D, max_seq_len bound used for the split count
    ("qwen3-0.6b b256 ctx1024", 256, 1024, 16, 8, 128, 4096),
    ("qwen3-0.6b b128 ctx2048", 128, 2048, 16, 8, 128, 4096),
    ("qwen3-0.6b b32 ctx1024", 32, 1024, 16, 8, 128, 4096),
    ("qwen2-0.5b b1 ctx256 bound32k", 1, 256, 14, 2, 64, 32768),
    ("qwen2-0.5b b1 ctx256 exact", 1, 256, 14, 2, 64, 256),
    ("qwen2-7b b1 ctx384 bound32k", 1, 384, 28, 4, 128, 32768),
]
CONFIGS = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))  # block_n, warps, stages
LONG_CONFIGS = list(itertools.product((64, 128, 256), (4, 8), (2, 3, 4)))


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = device_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() / ms / 1e6  # GB/s (read + write)


def long_main(out_dir: str) -> None:
    """Decode attention of the §9 long-prompt batch: Qwen3-0.6B heads, 128 sequences with
    contexts uniform in [4000, 8000], scattered 16-token pages; bf16 and fp8 caches, a config
    sweep per split count. GB/s counts the K and V bytes read (the cache's element size)."""
    import random
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rng = random.Random(0)
    B, H, Hkv, D, page = 128, 16, 8, 128, 16
    lens_l = [rng.randint(4000, 8000) for _ in range(B)]
    pages_per = [triton_cdiv(n, page) for n in lens_l]
    nblk = sum(pages_per)
    perm = (torch.randperm(nblk, device="cuda") + 1).to(torch.int32).tolist()
    width = max(pages_per)
    tables = torch.zeros(B, width, dtype=torch.int32)
    i = 0
    for b, n in enumerate(pages_per):
        tables[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    tables = tables.cuda()
    lens = torch.tensor(lens_l, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    rows = []
    for dtype, mode in ((torch.bfloat16, False), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True)):
        k = torch.randn(nblk + 1, page, Hkv, D, device="cuda", dtype=torch.bfloat16).to(dtype)
        v = torch.randn_like(k, dtype=torch.bfloat16).to(dtype)
        gb = 2 * sum(lens_l) * Hkv * D * k.element_size() / 1e9
        for splits in (1, 4, 8):
            for block_n, warps, stages in LONG_CONFIGS:
                try:
                    ms = device_ms(lambda: paged_decode_attention(
                        q, k, v, tables, lens, D ** -0.5, out=out, max_seq_len=32768, num_splits=splits,
                        block_n=block_n, num_warps=warps, num_stages=stages, f16_dot=mode))
                except Exception as e:  # noqa: BLE001 - a config may not fit in shared memory
                    rows.append({"dtype": str(dtype), "f16_dot": mode, "splits": splits, "block_n": block_n,
                                 "warps": warps,
                                 "stages": stages, "error": str(e)[:80]})
                    continue
                rows.append({"dtype": str(dtype), "f16_dot": mode, "splits": splits, "block_n": block_n, "warps": warps,
                             "stages": stages, "us": round(ms * 1e3, 1), "GB_s": round(gb / ms * 1e3, 1)})
        default_us = device_ms(lambda: paged_decode_attention(q, k, v, tables, lens, D ** -0.5, out=out,
                                                              max_seq_len=32768, f16_dot=mode)) * 1e3
        best = min((r for r in rows if r["dtype"] == str(dtype) and r.get("f16_dot") == mode and "us" in r),
                   key=lambda r: r["us"])
        print(f"{dtype} f16_dot={mode}: {gb:.2f} GB, default {default_us:.0f} us ({gb / default_us * 1e6:.0f} GB/s), "
              f"best {best}", flush=True)
        rows.append({"dtype": str(dtype), "f16_dot": mode, "default_us": round(default_us, 1),
                     "default_GB_s": round(gb / default_us * 1e6, 1), "kv_GB": gb})
        del k, v
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    with open(os.path.join(out_dir, "kernel-bench-long.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "copy_GB_s": bw, "rows": rows}, f, indent=2)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main() -> None:
    out_dir = os.environ.get("OUT", "artifacts")
    if "--long" in sys.argv:
        os.makedirs(out_dir, exist_ok=True)
        return long_main(out_dir)
    out_dir = os.environ.get("OUT", "artifacts")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    for name, B, L, H, Hkv, D, bound in SHAPES:
        page = 16
        nblk = B * L // page
        k = torch.randn(nblk + 1, page, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        perm = torch.randperm(nblk, device="cuda").to(torch.int32) + 1  # scattered pages
        tables = perm.view(B, L // page).contiguous()
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        gb = 2 * B * L * Hkv * D * 2 / 1e9
        splits = decode_split_config(B, Hkv, bound, q.device, head_dim=D)
        best = None
        results = []
        for block_n, warps, stages in CONFIGS:
            try:
                ms = device_ms(lambda: paged_decode_attention(q, k, v, tables, lens, D ** -0.5, out=out,
                                                          max_seq_len=bound, block_n=block_n,
                                                          num_warps=warps, num_stages=stages))
            except Exception as e:  # a config may not fit in shared memory
                results.append({"block_n": block_n, "warps": warps, "stages": stages, "error": str(e)[:80]})
                continue
            r = {"block_n": block_n, "warps": warps, "stages": stages, "us": ms * 1e3, "GB_s": gb / ms * 1e3}
            results.append(r)
            if best is None or r["us"] < best["us"]:
                best = r
        default_us = device_ms(lambda: paged_decode_attention(q, k, v, tables, lens, D ** -0.5, out=out,
                                                          max_seq_len=bound)) * 1e3
        row = {"shape": name, "splits": splits, "kv_GB": gb, "default_us": default_us,
               "default_GB_s": gb / default_us * 1e6, "best": best, "all": results}
        rows.append(row)
        print(f"{name}: splits={splits} default {default_us:.1f} us ({row['default_GB_s']:.0f} GB/s), "
              f"best {best}", flush=True)
        del k, v
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(0), "copy_GB_s": bw, "rows": rows}
    with open(os.path.join(out_dir, "kernel-bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"copy bandwidth {bw:.0f} GB/s")


if __name__ == "__main__":
    main()
