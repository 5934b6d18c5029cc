"""Prefill / extend attention on the GPU: the paged Triton kernel vs torch SDPA vs the split path.

    python benchmarks/prefill_attn_bench.py [--budget-s 150] [--iters 5]
        (writes $OUT/prefill-attn-bench.json: {"device", "date", "command", "metrics", "details"})

For Qwen2-7B heads (28 q / 4 kv) and Qwen3-0.6B heads (16 / 8), head_dim 128, bf16, page size
16 (``EngineConfig.block_size``), one sequence per shape ``(q_len, prefix)`` in
``SHAPES`` (its prefix and new tokens in a paged cache with shuffled pages), times with CUDA
events (mean of ``--iters`` calls after one untimed call):

* ``triton_default``: ``paged_extend_attention`` with its default launch config;
* ``triton_sweep``: block_m 64/128 x block_n 32/64/128 x warps 4/8 x stages 2/3/4 (configs
  that fail to compile, e.g. out of shared memory, are recorded as errors; the sweep stops
  when ``--budget-s`` of wall time is spent: compiling dominates);
* prefix-0 shapes: causal ``F.scaled_dot_product_attention`` on contiguous ``[1, H, L, D]``
  per backend (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION) with ``enable_gqa=True``
  and with ``repeat_interleave``d k/v (the repeat included in the time), and the LSE-returning
  aten ops ``_scaled_dot_product_flash_attention`` / ``_scaled_dot_product_cudnn_attention``;
* every shape: ``split`` = ``attention/prefill_split.split_extend_attention`` (SDPA on the new
  tokens + the paged prefix kernel with the fused LSE merge), its ``prefix_kernel`` alone, and
  ``sdpa_prefix_gathered`` (the alternative: gather the prefix pages contiguous + non-causal
  SDPA with LSE; the gather included).

Metrics per ``<model>/q<q_len>_p<prefix>``: ``<variant>_ms`` and ``<variant>_tflops`` with the
causal FLOPs ``4 * H * D * (q_len * prefix + q_len * (q_len + 1) / 2)``, ``best_triton_config``,
``split_speedup`` (triton_default / split), ``split_max_abs_err`` (max |split - triton_default|),
``cudnn_fresh_shape_first_call_ms`` (prefix-0 shapes: one cuDNN call at q_len - 3, a shape
not seen before: torch builds a cuDNN graph per shape, and chunk lengths vary in serving). Runs in ~1-3 minutes on an H200 (compilation bound).
"""
from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from miniinfer.attention.metadata import AttentionMetadata
from miniinfer.bench.common import device_ms
from miniinfer.attention.prefill_split import plan_split, split_extend_attention
from miniinfer.config import EngineConfig
from miniinfer.kernels.extend_attention import paged_extend_attention, paged_prefix_attention

MODELS = {"qwen2-7b": (28, 4), "qwen3-0.6b": (16, 8)}
D = 128
SHAPES = [(8192, 0), (8192, 8192), (4096, 0), (2048, 4096), (512, 6000)]
SWEEP = list(itertools.product((128, 64), (64, 32, 128), (8, 4), (2, 3, 4)))  # bm, bn, warps, stages


def flops(H: int, q_len: int, prefix: int) -> float:
    return 4.0 * H * D * (q_len * prefix + q_len * (q_len + 1) / 2)


class Case:
    """One sequence: ``prefix`` cached tokens + ``q_len`` new ones, all in a paged cache."""

    def __init__(self, H: int, Hkv: int, q_len: int, prefix: int, page: int):
        L = prefix + q_len
        nblocks = -(-L // page)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(nblocks + 8, generator=g)[:nblocks]
        self.H, self.Hkv, self.q_len, self.prefix, self.page = H, Hkv, q_len, prefix, page
        dev = dict(device="cuda", dtype=torch.bfloat16)
        self.k_cache = torch.randn(nblocks + 8, page, Hkv, D, **dev)
        self.v_cache = torch.randn(nblocks + 8, page, Hkv, D, **dev)
        self.block_tables = perm.to(torch.int32).view(1, -1).cuda()
        slots = (perm.repeat_interleave(page) * page + torch.arange(page).repeat(nblocks))[:L].cuda()
        self.prefix_slots = slots[:prefix]
        self.k = self.k_cache.view(-1, Hkv, D)[slots[prefix:]]  # the step's new rows [n, Hkv, D]
        self.v = self.v_cache.view(-1, Hkv, D)[slots[prefix:]]
        self.q = torch.randn(q_len, H, D, **dev)
        self.qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        self.seq_lens = torch.tensor([L], dtype=torch.int32, device="cuda")
        self.meta = AttentionMetadata(
            num_decodes=0, num_decode_tokens=0, query_start_loc=self.qsl, seq_lens=self.seq_lens,
            block_tables=self.block_tables, slot_mapping=slots[prefix:], max_query_len=q_len,
            max_seq_len=L, query_start_loc_cpu=[0, q_len], seq_lens_cpu=[L])
        self.scale = 1 / math.sqrt(D)
        self.out = torch.empty_like(self.q)

    def triton(self, bm=None, bn=None, warps=None, stages=None):
        return lambda: paged_extend_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.qsl,
                                              self.seq_lens, self.q_len, self.scale, out=self.out, block_m=bm,
                                              block_n=bn, num_warps=warps, num_stages=stages)

    def bhld(self):
        """q [1, H, n, D], k/v [1, Hkv, n, D] contiguous (the new tokens)."""
        return (self.q.transpose(0, 1).unsqueeze(0).contiguous(), self.k.transpose(0, 1).unsqueeze(0).contiguous(),
                self.v.transpose(0, 1).unsqueeze(0).contiguous())


def sdpa_variants(c: Case) -> dict:
    """Causal SDPA on the new tokens: callables by name (prefix-0 shapes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = c.bhld()
    g = c.H // c.Hkv
    fns = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def gqa(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.scale, enable_gqa=True)

        def rep(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                      is_causal=True, scale=c.scale)
        fns[f"sdpa_{name}_gqa"], fns[f"sdpa_{name}_repeat"] = gqa, rep
    fns["aten_flash_lse_gqa"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=c.scale)
    fns["aten_flash_lse_repeat"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), 0.0, True, False, scale=c.scale)
    fns["aten_cudnn_lse_gqa"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=c.scale)
    fns["aten_cudnn_lse_repeat"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), None, True, 0.0, True, False, scale=c.scale)
    return fns


def split_variants(c: Case) -> dict:
    plan = plan_split(c.meta, 0, min_query_len=1)
    fns = {"split": lambda: split_extend_attention(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, plan, c.scale,
                                                   c.out)}
    if c.prefix == 0:
        return fns
    lse = torch.zeros(c.H, c.q_len, dtype=torch.float32, device="cuda")
    fns["prefix_kernel"] = lambda: paged_prefix_attention(
        c.q, c.k_cache, c.v_cache, c.block_tables, c.qsl, c.seq_lens, c.q_len, c.scale, out=c.out,
        merge_with=(c.out, lse))
    g = c.H // c.Hkv
    qb = c.q.transpose(0, 1).unsqueeze(0)

    def gathered(op: str):
        def run():
            kp = c.k_cache.view(-1, c.Hkv, D)[c.prefix_slots].transpose(0, 1).unsqueeze(0)
            vp = c.v_cache.view(-1, c.Hkv, D)[c.prefix_slots].transpose(0, 1).unsqueeze(0)
            if op == "cudnn":
                kp, vp = kp.repeat_interleave(g, 1), vp.repeat_interleave(g, 1)
                return torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kp, vp, None, True, 0.0, False, False,
                                                                          scale=c.scale)
            return torch.ops.aten._scaled_dot_product_flash_attention(qb, kp, vp, 0.0, False, False, scale=c.scale)
        return run
    fns["sdpa_prefix_gathered_flash"] = gathered("flash")
    fns["sdpa_prefix_gathered_cudnn"] = gathered("cudnn")
    return fns


def cudnn_fresh_shape_ms(c: Case) -> float | str:
    """Host wall ms of one cuDNN SDPA call at a q_len not seen before (graph build included)."""
    q, k, v = (x[:, :, :-3] for x in c.bhld())
    g = c.H // c.Hkv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    try:
        torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=c.scale)
        torch.cuda.synchronize()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return round((time.perf_counter() - t) * 1e3, 3)


def split_error(c: Case) -> float | str:
    """max |split - triton_default| over the outputs (bf16), or the error text."""
    try:
        ref = c.triton()().clone()
        split_variants(c)["split"]()
        return round((c.out.float() - ref.float()).abs().max().item(), 5)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def timed(fns: dict, fl: float, iters: int, metrics: dict, key: str, errors: dict) -> None:
    for name, fn in fns.items():
        try:
            ms = device_ms(fn, iters)
        except Exception as exc:  # unavailable backend / op: recorded, not fatal
            errors[f"{key}/{name}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        metrics[f"{key}/{name}_ms"] = round(ms, 4)
        metrics[f"{key}/{name}_tflops"] = round(fl / ms / 1e9, 1)


def run(budget_s: float, iters: int) -> tuple[dict, dict]:
    t0 = time.time()
    page = EngineConfig.block_size
    metrics: dict = {"page_size": page}
    details: dict = {"errors": {}, "sweep": {}, "sweep_skipped": []}
    cases = {(m, s): Case(*MODELS[m], *s, page) for m in MODELS for s in SHAPES}
    for (m, (n, p)), c in cases.items():  # the cheap, decisive numbers first
        key, fl = f"{m}/q{n}_p{p}", flops(c.H, n, p)
        timed({"triton_default": c.triton()}, fl, iters, metrics, key, details["errors"])
        timed(split_variants(c), fl, iters, metrics, key, details["errors"])
        if p == 0:
            timed(sdpa_variants(c), fl, iters, metrics, key, details["errors"])
            metrics[f"{key}/cudnn_fresh_shape_first_call_ms"] = cudnn_fresh_shape_ms(c)
        metrics[f"{key}/split_max_abs_err"] = split_error(c)
        if f"{key}/split_ms" in metrics and f"{key}/triton_default_ms" in metrics:
            metrics[f"{key}/split_speedup"] = round(metrics[f"{key}/triton_default_ms"] / metrics[f"{key}/split_ms"], 3)
    for cfg in SWEEP:  # config-major: one compile per config and model, all shapes timed
        if time.time() - t0 > budget_s:
            details["sweep_skipped"].append(list(cfg))
            continue
        for (m, (n, p)), c in cases.items():
            key, name = f"{m}/q{n}_p{p}", "bm{}_bn{}_w{}_s{}".format(*cfg)
            row: dict = {}
            timed({name: c.triton(*cfg)}, flops(c.H, n, p), iters, row, key, details["errors"])
            details["sweep"].update(row)
    for (m, (n, p)) in cases:
        key = f"{m}/q{n}_p{p}"
        rows = {k.split("/")[-1][:-3]: v for k, v in details["sweep"].items()
                if k.startswith(key + "/") and k.endswith("_ms")}
        if rows:
            best = min(rows, key=rows.get)
            metrics[f"{key}/best_triton_config"] = best
            metrics[f"{key}/best_triton_ms"] = rows[best]
            metrics[f"{key}/best_triton_tflops"] = round(flops(MODELS[m][0], n, p) / rows[best] / 1e9, 1)
    from miniinfer.attention import prefill_split
    details["sdpa_ops_dropped_by_split"] = sorted(map(list, prefill_split._bad_ops))  # (op, repeat_kv) that raised
    details["wall_s"] = round(time.time() - t0, 1)
    return metrics, details


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=140.0, help="stop the Triton sweep after this wall time")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prefill_attn_bench needs CUDA")
    torch.manual_seed(0)
    metrics, details = run(args.budget_s, args.iters)
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv]), "metrics": metrics,
              "details": dict(details, torch=torch.__version__, cudnn=torch.backends.cudnn.version())}
    out_dir = os.environ.get("OUT", "artifacts")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "prefill-attn-bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in metrics.items():
        if k.endswith(("_ms", "speedup", "config", "err")) and "tflops" not in k:
            print(f"{k:60s} {v}")
    print("wrote", path)


if __name__ == "__main__":
    main()
