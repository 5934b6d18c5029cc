"""Grammar-aware drafting A/B (issue #14, "the drafter respects the grammar too"): EAGLE on the
embedded SmolLM2, JSON-schema requests (the §10 schema), batch 1, greedy; the head's proposals
masked by each request's grammar (``EagleDrafter.grammar_aware``, the default) vs not, the same
engine and prompts, alternating rounds. Reports mean accepted length, acceptance rate and TPOT
per mode for a chain and an EAGLE-2 tree, and whether the outputs are identical (they must be:
the verify masks decide either way).

    python benchmarks/grammar_draft_bench.py --out benchmarks/results/<date>-grammar-draft-<dev>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import structured_output_bench as sob  # noqa: E402  (the §10 schema)

from miniinfer import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

CONFIGS = {"chain": {"method": "eagle", "num_speculative_tokens": 3},
           "tree": {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}}
QUESTIONS = ["Describe a person as JSON.", "Give me a product record as JSON.", "Create a JSON profile for a cat.",
             "Output a JSON object about a city."]


def run_mode(llm, prompts, params, aware: bool) -> tuple[dict, list]:
    llm.engine.proposer.grammar_aware = aware
    keys = ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")
    s0, t, n, outs = llm.engine.stats(), time.perf_counter(), 0, []
    for p in prompts:
        o = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
        n += len(o.token_ids)
        outs.append(o.token_ids)
    wall = time.perf_counter() - t
    d = {k: llm.engine.stats()[k] - s0[k] for k in keys}
    return {"mean_accepted_len": 1 + d[keys[2]] / max(d[keys[0]], 1),
            "acceptance_rate": d[keys[2]] / max(d[keys[1]], 1), "tpot_ms": wall / n * 1e3}, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    metrics = {}
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens,
                            structured_outputs=StructuredOutputsParams(json=sob.SCHEMA))
    for name, cfg in CONFIGS.items():
        llm = LLM(None, device=a.device, dtype="float32" if a.device == "cpu" else "bfloat16", max_model_len=2048,
                  progress=False, speculative_config=cfg)
        prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        runs = {True: [], False: []}
        outs = {}
        for _ in range(a.rounds):
            for aware in (False, True):
                m, outs[aware] = run_mode(llm, prompts, params, aware)
                runs[aware].append(m)
        for aware, tag in ((True, "aware"), (False, "plain")):
            for k in runs[aware][0]:
                metrics[f"{name}_{tag}_{k}"] = sum(r[k] for r in runs[aware]) / len(runs[aware])
        metrics[f"{name}_accepted_len_gain"] = metrics[f"{name}_aware_mean_accepted_len"] / metrics[f"{name}_plain_mean_accepted_len"]
        metrics[f"{name}_tpot_gain"] = metrics[f"{name}_plain_tpot_ms"] / metrics[f"{name}_aware_tpot_ms"]
        metrics[f"{name}_outputs_identical"] = outs[True] == outs[False]
        print(json.dumps({k: v for k, v in metrics.items() if k.startswith(name)}), flush=True)
        del llm
    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (2 cores)"
    with open(a.out, "w") as f:
        json.dump({"device": device, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                   "metrics": metrics}, f, indent=1)


if __name__ == "__main__":
    main()
