"""Where the §5 shared-prefix TTFT goes: the workload of ``miniinfer bench prefix`` (64 prompts =
one 2,048-token prefix + 64 own tokens, 64 greedy tokens each, all submitted at once), driven
step by step with the prefix cache on, printing each engine step (host wall, sequences and
tokens scheduled, prefill / decode split, first tokens delivered) and the TTFT distribution.

    python benchmarks/prefix_timeline.py [--model qwen2-0.5b] [--no-cache] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from miniinfer.bench.common import sync
from miniinfer.bench.offline import _llm, prefix_workload
from miniinfer.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2-0.5b")
    ap.add_argument("--no-cache", dest="cache", action="store_false")
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over the first 3 steps: top host ops and GPU kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    llm = _llm(args.model, enable_prefix_caching=args.cache, max_model_len=args.max_model_len)
    vocab = min(10000, llm.engine.model_config.vocab_size)
    prompts = prefix_workload(5, args.prefix_len, args.requests, vocab)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    eng = llm.engine
    steps = []
    sched_fn = eng.scheduler.schedule

    def schedule():  # record what each step schedules
        out = sched_fn()
        steps.append(dict(seqs=len(out.scheduled), tokens=sum(s.num_new_tokens for s in out.scheduled),
                          prefills=sum(s.num_new_tokens > 1 for s in out.scheduled)))
        return out
    eng.scheduler.schedule = schedule
    sync()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params, stream=True)
    first: dict[str, float] = {}
    first_step: dict[str, int] = {}
    step_walls = []
    prof = None
    if args.profile:
        import torch
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    while eng.has_unfinished_requests():
        if prof is not None and len(step_walls) == 3:
            sync()
            prof.__exit__(None, None, None)
            for key in ("self_cpu_time_total", "self_device_time_total"):
                try:
                    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70))
                except Exception as e:  # the sort key's name differs across torch versions
                    print(f"({key}: {e!r})")
            prof = None
        t = time.perf_counter()
        outs = eng.step()
        step_walls.append((t - t0, time.perf_counter() - t))
        for o in outs:
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = time.perf_counter() - t0
                first_step[o.request_id] = len(step_walls) - 1
    sync()
    wall = time.perf_counter() - t0
    ttfts = sorted(first.values())
    print(f"cache={'on' if args.cache else 'off'} wall {wall * 1e3:.1f} ms, TTFT mean "
          f"{statistics.mean(ttfts) * 1e3:.1f} ms (min {ttfts[0] * 1e3:.1f}, p50 "
          f"{ttfts[len(ttfts) // 2] * 1e3:.1f}, max {ttfts[-1] * 1e3:.1f})")
    for i, (st, (start, dur)) in enumerate(zip(steps, step_walls)):
        got = sum(1 for v in first_step.values() if v == i)
        if i < 8 or got:
            print(f"step {i:3d} at {start * 1e3:8.2f} ms: host {dur * 1e3:7.2f} ms, {st['seqs']:3d} seqs, "
                  f"{st['tokens']:5d} tokens ({st['prefills']} prefill chunks), first tokens {got}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(wall_ms=wall * 1e3, ttft_ms=[t * 1e3 for t in ttfts], steps=steps,
                           step_walls_ms=[(a * 1e3, b * 1e3) for a, b in step_walls]), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
