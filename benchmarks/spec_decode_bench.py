"""Speculative decoding benchmark (shared/BENCHMARKS.md §11), baseline = the same engine with
speculation off, in the same process.

    python benchmarks/spec_decode_bench.py --out results.json [--device cuda|cpu] [--quick]
        [--qwen7b .vllm/configs/Qwen2-7B]

* embedded SmolLM2 (real weights), batch 1, greedy, 256 tokens, n-gram on code / repetitive
  chat prompts: ``ngram_bs1_speedup_<dev>`` (TPOT off ÷ on), ``ngram_mean_accepted_len``;
  its EAGLE head on the 32 held-out chat prompts (benchmarks/eagle_eval_prompts.json):
  ``eagle_bs1_speedup_<gpu|cpu>``, ``eagle_mean_accepted_len_<gpu|cpu>``; the EAGLE-2 tree
  also at ``--eagle-batch`` sizes (prompts that many at a time: ``eagle_tree_bs<b>_*``);
* Qwen2-7B dummy weights (GPU): ``verify_cost_ratio_<n>``: one verify forward + rejection
  sampler over n tokens (the root + n − 1 tree nodes, tree-masked) ÷ one plain decode step, both
  at a 512-token context (a batch-1 verify of up to 64 tokens replays a prefill graph);
  ``spec_throughput_gain_bs<b>`` with n-gram on vs off (dummy weights: the acceptance says
  nothing about real text, the cost of verifying does).
* where the fused EAGLE step runs (CUDA), the same engine again with overlap scheduling's
  run-ahead off: ``*_tpot_ms_on_sync_*``, ``*_run_ahead_gain_*`` (TPOT off ÷ on).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

from miniinfer import LLM, SamplingParams
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput

CODE_PROMPTS = [
    "Write a Python class for a bank account with deposit, withdraw and balance methods, with docstrings.",
    "Rewrite this function with type hints and a docstring:\ndef area(w, h):\n    return w * h\n"
    "def perimeter(w, h):\n    return 2 * (w + h)\n",
    "Write an HTML page with a table of five fruits and their colours.",
    "List the first 30 even numbers separated by commas.",
    "Repeat the following sentence five times: the cat sat on the mat and looked at the hat.",
    "Write a SQL query that selects name, age and city from users where age > 30, then the same for age > 40.",
    "Write a JSON array of 6 objects, each with fields id, name and email.",
    "Convert to a Python dict: name=Alice, age=30, city=Paris, job=engineer, pet=cat.",
]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bs1_tpot(llm, prompts, max_tokens, device, batch: int = 1) -> tuple[float, int]:
    """Mean per-token time (ms) of a request over prompts run ``batch`` at a time (wall time ×
    batch ÷ tokens), and tokens generated."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    total_t, total_n = 0.0, 0
    for i in range(0, len(prompts), batch):
        _sync(device)
        t = time.perf_counter()
        outs = llm.generate(prompts[i:i + batch], params, use_tqdm=False)
        _sync(device)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        total_t += (time.perf_counter() - t) * len(outs)
        total_n += n
    return total_t / total_n * 1e3, total_n


def _bs1_on_off(texts: list[str], spec: dict, device: str, max_tokens: int, batch: int = 1,
                int8: bool = False) -> dict:
    """The embedded SmolLM2, chat prompts ``batch`` at a time: TPOT without and with ``spec``
    (``int8``: the CPU's int8-activation mode on both sides)."""
    kw = dict(dtype="float32" if device == "cpu" else "bfloat16", device=device, max_model_len=2048, progress=False)
    if int8:
        kw["cpu_int8_activations"] = True
    base = LLM(None, **kw)
    prompts = [base.engine.apply_chat_template([{"role": "user", "content": p}]) for p in texts]
    bs1_tpot(base, prompts[:batch], 16, device, batch)  # warm
    off_ms, n_off = bs1_tpot(base, prompts, max_tokens, device, batch)
    del base
    llm = LLM(None, speculative_config=spec, **kw)
    bs1_tpot(llm, prompts[:batch], 16, device, batch)
    s0 = llm.engine.stats()
    on_ms, n_on = bs1_tpot(llm, prompts, max_tokens, device, batch)
    s1 = llm.engine.stats()
    drafts, drafted, acc = (s1[k] - s0[k] for k in ("spec_num_drafts", "spec_num_draft_tokens",
                                                    "spec_num_accepted_tokens"))
    out = {"tpot_ms_off": off_ms, "tpot_ms_on": on_ms, "speedup": off_ms / on_ms,
           "mean_accepted_len": 1 + acc / max(drafts, 1), "acceptance_rate": acc / max(drafted, 1),
           "tokens_off": n_off, "tokens_on": n_on}
    fused = getattr(llm.engine.proposer, "fused", None)
    if fused is not None and fused.enabled and llm.engine.config.overlap_scheduling:
        # the same engine with overlap scheduling's run-ahead off (step N + 1 queued only after N is processed)
        out["run_ahead_steps"] = fused.num_run_ahead
        fused.run_ahead_enabled = False
        out["tpot_ms_on_sync"] = bs1_tpot(llm, prompts, max_tokens, device, batch)[0]
        out["run_ahead_gain"] = out["tpot_ms_on_sync"] / on_ms
        fused.run_ahead_enabled = True
    return out


def smollm2_ngram(device: str, max_tokens: int, k: int, quick: bool) -> dict:
    r = _bs1_on_off(CODE_PROMPTS[:3] if quick else CODE_PROMPTS,
                    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
                    device, max_tokens)
    return {f"ngram_bs1_tpot_ms_off_{device}": r["tpot_ms_off"], f"ngram_bs1_tpot_ms_on_{device}": r["tpot_ms_on"],
            f"ngram_bs1_speedup_{device}": r["speedup"], f"ngram_mean_accepted_len_{device}": r["mean_accepted_len"],
            f"ngram_tokens_off_{device}": r["tokens_off"], f"ngram_tokens_on_{device}": r["tokens_on"]}


def smollm2_eagle(device: str, max_tokens: int, k: int, quick: bool, head: str | None = None,
                  topk: int = 1, nodes: int | None = None, batch: int = 1, int8: bool = False) -> dict:
    """The embedded SmolLM2 with its EAGLE head on the 32 held-out chat prompts, batch 1 (or
    ``batch`` at a time: keys ``*_bs<batch>_*``): a chain of k drafts (``eagle_*`` keys), or
    with ``topk`` > 1 an EAGLE-2 tree of depth k and ``nodes`` nodes (``eagle_tree_*`` keys)."""
    import os
    path = os.path.join(os.path.dirname(__file__), "eagle_eval_prompts.json")
    with open(path) as f:
        texts = json.load(f)["prompts"]
    spec = {"method": "eagle", "num_speculative_tokens": k, **({"model": head} if head else {})}
    if topk > 1:
        spec.update(eagle_topk=topk, num_draft_tokens=nodes)
    r = _bs1_on_off(texts[:max(4, batch)] if quick else texts, spec, device, max_tokens, batch, int8)
    tag = "gpu" if device == "cuda" else "cpu"
    name = "eagle_tree" if topk > 1 else "eagle"
    bs = f"bs{batch}"
    acc = "" if batch == 1 else f"_{bs}"
    out = {f"{name}_{bs}_tpot_ms_off_{tag}": r["tpot_ms_off"], f"{name}_{bs}_tpot_ms_on_{tag}": r["tpot_ms_on"],
           f"{name}_{bs}_speedup_{tag}": r["speedup"], f"{name}_mean_accepted_len{acc}_{tag}": r["mean_accepted_len"],
           f"{name}_acceptance_rate{acc}_{tag}": r["acceptance_rate"]}
    if "run_ahead_gain" in r:
        out[f"{name}_{bs}_tpot_ms_on_sync_{tag}"] = r["tpot_ms_on_sync"]
        out[f"{name}_{bs}_run_ahead_gain_{tag}"] = r["run_ahead_gain"]
    if topk > 1:
        out[f"eagle_tree_config_{tag}"] = {"depth": k, "eagle_topk": topk, "num_draft_tokens": nodes}
    return out


def _time_cuda(fn, reps: int) -> float:
    """Median ms of ``fn`` (synchronized on CUDA; on the CPU the work is synchronous)."""
    from miniinfer.bench.common import sync
    for _ in range(3):
        fn()
    sync()
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs) * 1e3


def verify_cost(llm, context: int = 512, sizes=(8, 16, 32, 64), reps: int = 30) -> dict:
    """One verify (forward + tree-masked attention + rejection sampler + accepted-path K/V
    move) of n tokens (the root and n − 1 tree nodes, 4 children per node) ÷ one plain decode
    step (graph)."""
    eng = llm.engine
    runner, kv = eng.runner, eng.kv
    seq = Sequence("bench", 0, list(range(100, 100 + context)), context, SamplingParams(temperature=0))
    assert kv.allocate(seq.block_table, context + max(sizes))
    seq.num_computed_tokens = context - 1

    def step(n):
        parents = [j // 4 - 1 for j in range(n - 1)] if n > 1 else None  # a tree: 4 children per node
        s = ScheduledSeq(seq, n, context - 1, list(range(200, 200 + n - 1)), parents)
        def run():
            fwd = runner.forward(SchedulerOutput([s]), None)
            st = runner.sample(fwd)
            runner.collect(st)
        return run
    out = {"verify_decode_step_ms": _time_cuda(step(1), reps)}
    for n in sizes:
        ms = _time_cuda(step(n), reps)
        out[f"verify_{n}_ms"] = ms
        out[f"verify_cost_ratio_{n}"] = ms / out["verify_decode_step_ms"]
    kv.free(seq.block_table)
    return out


def throughput_gain(llm_off, llm_on, batch_sizes, max_tokens) -> dict:
    out = {}
    for b in batch_sizes:
        prompts = [{"prompt_token_ids": [(i * 37 + j * 11) % 10000 for j in range(128)]} for i in range(b)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        res = {}
        for name, llm in (("off", llm_off), ("on", llm_on)):
            llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            res[name] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
        out[f"spec_tput_off_bs{b}_tok_s"] = res["off"]
        out[f"spec_tput_on_bs{b}_tok_s"] = res["on"]
        out[f"spec_throughput_gain_bs{b}"] = res["on"] / res["off"]
    s = llm_on.engine.stats()
    out["dummy_ngram_acceptance_rate"] = s["spec_acceptance_rate"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--qwen7b", default=None, help="Qwen2-7B config folder (GPU parts)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: smollm2,eagle,chain (EAGLE's chain run only),verify,tput,cpu_verify")
    ap.add_argument("--eagle-head", default=None, help="EAGLE head file (default: the shipped one)")
    ap.add_argument("--eagle-k", type=int, default=3)
    ap.add_argument("--cpu-int8", action="store_true", help="EAGLE runs with cpu_int8_activations (CPU)")
    ap.add_argument("--eagle-tree", default="4,4,10",
                    help="EAGLE-2 tree run: depth,eagle_topk,num_draft_tokens ('' to skip)")
    ap.add_argument("--eagle-batch", type=int, nargs="+", default=[1],
                    help="batch sizes of the EAGLE-2 tree run (prompts that many at a time; keys *_bs<b>_*)")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    metrics = {} if "smollm2" in skip else smollm2_ngram(a.device, a.max_tokens, a.k, a.quick)
    print(json.dumps(metrics), flush=True)
    if "eagle" not in skip and "chain" not in skip:
        metrics.update(smollm2_eagle(a.device, a.max_tokens, a.eagle_k, a.quick, a.eagle_head, int8=a.cpu_int8))
        print(json.dumps(metrics), flush=True)
    if "eagle" not in skip and a.eagle_tree:
        depth, topk, nodes = (int(x) for x in a.eagle_tree.split(","))
        for b in a.eagle_batch:
            metrics.update(smollm2_eagle(a.device, a.max_tokens, depth, a.quick, a.eagle_head, topk, nodes, b,
                                         int8=a.cpu_int8))
            print(json.dumps(metrics), flush=True)
    if "cpu_verify" not in skip and a.device == "cpu":
        # the embedded model's verify cost on the CPU (compute-bound past a few rows: it bounds
        # what speculation can win there); fp32 activations, then int8 ones on every Q4_1 call
        for prefix, int8 in (("smollm2_cpu_", False), ("smollm2_cpu_int8_", True)):
            llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, cpu_int8_activations=int8)
            metrics.update({prefix + k: v for k, v in verify_cost(llm, sizes=(2, 4, 8, 11, 16), reps=20).items()})
            print(json.dumps(metrics), flush=True)
            del llm
    if a.qwen7b and a.device == "cuda":
        # two engines side by side: an explicit cache size each (32k tokens, ~1.8 GB)
        kw = dict(load_format="dummy", dtype="bfloat16", max_model_len=4096, num_kv_blocks=2048, progress=False)
        off = LLM(a.qwen7b, **kw)
        if "verify" not in skip:
            metrics.update({f"qwen2_7b_{k}": v for k, v in verify_cost(off).items()})
        print(json.dumps(metrics), flush=True)
        if "tput" not in skip:
            on = LLM(a.qwen7b, speculative_config={"method": "ngram", "num_speculative_tokens": a.k}, **kw)
            metrics.update({f"qwen2_7b_{k}": v for k, v in throughput_gain(off, on, (1, 8, 32), 128).items()})
    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    result = {"device": device, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "metrics": metrics}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
