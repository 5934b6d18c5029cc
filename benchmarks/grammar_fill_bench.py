"""Where the time of a many-row grammar mask goes: per-row fill cost and how the fill of one
step's rows scales with threads (the §10 batch-64 question). CPU only; no model, no GPU.

B matchers of the §10 schema (``structured_output_bench.SCHEMA``) on a real tokenizer walk
``--steps`` steps together, like a batch of dummy-weight requests: each step every matcher's
row is filled, a token is drawn uniformly among the allowed ones (``random.Random(seed)``;
what argmax over random logits does), and accepted; a matcher whose JSON completes restarts.
At every step each strategy fills the *same* states (a fill does not move a matcher):

* ``serial``: one ``GrammarMatcher.fill_next_token_bitmask`` call per row on this thread;
* ``pool_T``: MiniInfer's ``_FillPool`` with T threads (persistent workers + this thread);
* ``native_T``: xgrammar's ``BatchGrammarMatcher(max_threads=T).batch_fill_next_token_bitmask``.

Also timed per step: accepting the B tokens one by one (``accept_token``) and with
``BatchGrammarMatcher.batch_accept_token``. Reported: p50/p99 µs per step of each strategy,
the serial per-row mean, and each strategy's speedup over serial (p50 ÷ p50)::

    python benchmarks/grammar_fill_bench.py --tokenizer .vllm/bench_tokenizer_qwen2 \\
        --batch 64 --steps 200 --threads 2 4 8 16 --out /tmp/fill.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def allowed_tokens(row: torch.Tensor, vocab: int) -> torch.Tensor:
    """Token ids whose bit is set in one int32 bitmask row."""
    bits = (row.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="HF tokenizer folder (Qwen2's vocabulary)")
    ap.add_argument("--vocab-size", type=int, default=151936, help="the model's padded vocabulary")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--schema-variant", choices=["bounded", "unbounded-strings"], default="bounded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import xgrammar as xgr
    from transformers import AutoTokenizer

    from miniinfer.structured_output.fill_pool import FillPool as _FillPool
    from structured_output_bench import SCHEMA

    schema = json.loads(json.dumps(SCHEMA))
    if args.schema_variant == "unbounded-strings":
        for p in schema["properties"].values():
            if p.get("type") == "string":
                p.pop("minLength", None), p.pop("maxLength", None)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=args.vocab_size,
                                              stop_token_ids=[tok.eos_token_id])
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    B = args.batch
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(B)]
    bitmask = xgr.allocate_token_bitmask(B, info.vocab_size)
    rows = list(range(B))
    pools = {t: _FillPool(t) for t in args.threads}
    natives = {t: xgr.BatchGrammarMatcher(max_threads=t) for t in args.threads}
    rng = random.Random(args.seed)

    strategies = {"serial": lambda: [m.fill_next_token_bitmask(bitmask, i) for i, m in enumerate(matchers)]}
    for t, pool in pools.items():
        strategies[f"pool_{t}"] = (lambda p: lambda: p.fill(matchers, bitmask, rows))(pool)
    for t, nat in natives.items():
        strategies[f"native_{t}"] = (lambda n: lambda: n.batch_fill_next_token_bitmask(matchers, bitmask))(nat)
    times: dict[str, list[float]] = {k: [] for k in strategies}
    times["accept_loop"], times["accept_batch"] = [], []
    restarts = 0
    for step in range(args.steps):
        order = list(strategies)
        rng.shuffle(order)  # no strategy always first after the accept (warm caches)
        for name in order:
            t0 = time.perf_counter()
            strategies[name]()
            times[name].append((time.perf_counter() - t0) * 1e6)
        strategies["serial"]()  # the reference mask the tokens are drawn from
        tokens = []
        for i in range(B):
            ids = allowed_tokens(bitmask[i], info.vocab_size)
            tokens.append(int(ids[rng.randrange(len(ids))]))
        half = B // 2  # half the rows accept one by one, half in one batch call (same states)
        t0 = time.perf_counter()
        ok = [matchers[i].accept_token(tokens[i]) for i in range(half)]
        times["accept_loop"].append((time.perf_counter() - t0) * 1e6 * B / max(half, 1))
        t0 = time.perf_counter()
        ok += xgr.BatchGrammarMatcher.batch_accept_token(matchers[half:], tokens[half:])
        times["accept_batch"].append((time.perf_counter() - t0) * 1e6 * B / max(B - half, 1))
        assert all(ok), "a token drawn from the mask was rejected"
        for i, m in enumerate(matchers):
            if m.is_terminated():
                matchers[i] = xgr.GrammarMatcher(grammar)
                restarts += 1
    serial_p50 = percentile(times["serial"], 50)
    metrics = {"batch": B, "steps": args.steps, "vocab_size": info.vocab_size, "restarts": restarts,
               "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "serial_row_us_mean": sum(times["serial"]) / len(times["serial"]) / B}
    for name, xs in times.items():
        metrics[f"{name}_us_p50"] = round(percentile(xs, 50), 1)
        metrics[f"{name}_us_p99"] = round(percentile(xs, 99), 1)
        if name in strategies and name != "serial":
            metrics[f"{name}_speedup_p50"] = round(serial_p50 / percentile(xs, 50), 2)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}, {metrics['cpus']} CPUs)",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
              "metrics": metrics, "details": {"schema_variant": args.schema_variant, "threads": args.threads}}
    print(json.dumps(metrics, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
