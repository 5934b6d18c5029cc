"""Where a speculative step's wall time goes: host phases per engine step, and the GPU's busy time.

    python benchmarks/spec_step_phases.py --out phases.json [--prompts 8] [--max-tokens 128]
        [--tree 4,4,10]

The embedded SmolLM2 with its EAGLE head, batch 1, greedy, the held-out chat prompts. Phases
(``step_phases.StepPhases`` plus the drafter's): ``propose`` (proposer.propose_for: the catch-up's
inputs, the head and tree graphs, the tree's read), within it ``catchup`` (head_forward) and
``tree`` (the static tree program's staging, replay and read), ``record`` (the drafter keeping the
verify's features), ``collect`` (waiting for the draws, the accept walk, the KV compaction),
``process`` (detokenize, stops). ``gpu_busy_us_per_step``: CUDA events around every kernel-issuing
phase are not used (they would add syncs); instead a torch.profiler pass over a few requests sums
the kernels' device time per step. Baselines in the same run: speculation off (plain decode), and speculation through the host
path (``MINIINFER_SPEC_FUSED=0``) against the fused step (``spec_decode/eagle_fused.py``).
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
from step_phases import StepPhases  # noqa: E402

from miniinfer import LLM, SamplingParams  # noqa: E402


class SpecPhases(StepPhases):
    PHASES = {**StepPhases.PHASES, "propose": ("proposer", "propose_for"), "record": ("proposer", "record")}

    def __init__(self, engine):
        super().__init__(engine)
        drafter = engine.proposer
        for phase, obj, name in (("catchup", drafter, "head_forward"), ("tree", drafter.static, "grow")):
            if obj is not None:
                setattr(obj, name, self._wrap(phase, getattr(obj, name)))
                self._patched.append((obj, name))


def kernel_us_per_step(llm, prompts, params) -> float:
    """Device time of all kernels per engine step (torch.profiler, one pass)."""
    from torch.profiler import ProfilerActivity, profile
    steps = [0]
    step = llm.engine.step

    def counted():
        steps[0] += 1
        return step()
    llm.engine.step = counted
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    del llm.engine.step
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return total / max(steps[0], 1)


def run(spec: dict | None, prompts_text: list[str], max_tokens: int, device: str, fused: bool = True) -> dict:
    os.environ["MINIINFER_SPEC_FUSED"] = "1" if fused else "0"  # read when the drafter is built
    kw = dict(dtype="bfloat16" if device == "cuda" else "float32", device=device, max_model_len=2048, progress=False)
    llm = LLM(None, speculative_config=spec, **kw)
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts_text]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    timer = SpecPhases(llm.engine) if spec else StepPhases(llm.engine)
    n_tok, wall = 0, 0.0
    for p in prompts:  # one at a time: batch 1
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = llm.generate([p], params, use_tqdm=False)
        if device == "cuda":
            torch.cuda.synchronize()
        wall += time.perf_counter() - t
        n_tok += len(out[0].outputs[0].token_ids)
    phases = timer.summary()
    timer.remove()
    r = {"tpot_ms": wall / n_tok * 1e3, "tokens": n_tok, "host_phases_us_per_step": phases,
         "tokens_per_step": n_tok / max(phases.get("steps", 1), 1)}
    if device == "cuda":
        r["kernel_us_per_step"] = kernel_us_per_step(llm, prompts[:2], params)
    del llm
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tree", default="4,4,10", help="depth,eagle_topk,num_draft_tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    with open(os.path.join(os.path.dirname(__file__), "eagle_eval_prompts.json")) as f:
        texts = json.load(f)["prompts"][:a.prompts]
    d, k, n = (int(x) for x in a.tree.split(","))
    spec = {"method": "eagle", "num_speculative_tokens": d, "eagle_topk": k, "num_draft_tokens": n}
    off = run(None, texts, a.max_tokens, a.device)
    on = run(spec, texts, a.max_tokens, a.device)
    host = run(spec, texts, a.max_tokens, a.device, fused=False)
    metrics = {"off": off, "on": on, "on_host_path": host, "speedup": off["tpot_ms"] / on["tpot_ms"],
               "speedup_host_path": off["tpot_ms"] / host["tpot_ms"], "fused_vs_host": host["tpot_ms"] / on["tpot_ms"],
               "tree": spec}
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    with open(a.out, "w") as f:
        json.dump({"device": name, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                   "metrics": metrics}, f, indent=1)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
