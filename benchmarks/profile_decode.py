"""Profile a run: top GPU kernels, GPU idle fraction between steps, and where the host's
time per step goes. Writes JSON under $OUT.

    python benchmarks/profile_decode.py [--model qwen3-0.6b] [--batch 256] [--no-overlap]
        [--workload decode|throughput] [--timer cupti|events]

``--timer cupti`` traces every kernel with the torch profiler (kernel table; tracing slows
launches a little). ``--timer events`` brackets each step's device work with two CUDA events
and no tracer: the GPU idle fraction is 1 - (sum of step spans) / wall, where a step's span
runs from its first queued op starting to its last finishing (a step that the host feeds
slower than the GPU runs counts as busy: this measures the gaps *between* steps).
``--workload throughput`` is shared/BENCHMARKS.md §1 (256 requests, 100-1024 in and out);
``--workload long`` is §9's throughput run (128 requests of 4,000-8,000 tokens, 256 out,
``max_model_len`` 32768; pair it with ``--prefill-attention auto|triton`` to see where the split
prefill path's time goes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from miniinfer import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--tag", default="")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (rank 0's kernels are traced)")
    ap.add_argument("--overlap", dest="overlap", action="store_true")
    ap.add_argument("--no-overlap", dest="overlap", action="store_false")
    ap.set_defaults(overlap=True)
    ap.add_argument("--workload", choices=["decode", "throughput", "prefix", "ttft1024", "long"], default="decode")
    ap.add_argument("--prefill-attention", default="triton", choices=["triton", "auto"])
    ap.add_argument("--trace-steps", type=int, default=0, help="events timer: per-step detail of the first N steps")
    ap.add_argument("--timer", choices=["cupti", "events"], default="cupti")
    ap.add_argument("--window", default="", help="events timer: also trace steps A:B with the profiler")
    a, _ = ap.parse_known_args()
    out_dir = os.environ.get("OUT", "artifacts")
    os.makedirs(out_dir, exist_ok=True)
    llm = LLM(a.model, load_format="dummy", max_model_len=32768 if a.workload == "long" else 4096,
              overlap_scheduling=a.overlap, progress=False, tensor_parallel_size=a.tp,
              prefill_attention=a.prefill_attention)
    rng = random.Random(0)
    if a.workload == "prefix":  # shared/BENCHMARKS.md §5 (Qwen2-0.5B in the bench)
        system = [rng.randrange(10000) for _ in range(2048)]
        prompts = [system + [rng.randrange(10000) for _ in range(64)] for _ in range(64)]
        p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    elif a.workload == "ttft1024":
        prompts = [[rng.randrange(10000) for _ in range(1024)]]
        p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    elif a.workload == "long":  # shared/BENCHMARKS.md §9 throughput, the harness's prompts
        random.seed(0)
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(4000, 8000))] for _ in range(128)]
        p = SamplingParams(temperature=0.6, max_tokens=256, ignore_eos=True)
    elif a.workload == "throughput":
        from miniinfer.bench.common import random_workload
        prompts, outs = random_workload(256, (100, 1024), (100, 1024), seed=0)
        p = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True) for o in outs]
    else:
        prompts = [[rng.randrange(10000) for _ in range(a.prompt_len)] for _ in range(a.batch)]
        p = SamplingParams(temperature=0.6, max_tokens=a.out_len, ignore_eos=True)
    warm = [[rng.randrange(10000) for _ in range(300)] for _ in range(8)]
    llm.generate(warm, SamplingParams(max_tokens=4), use_tqdm=False)
    llm.generate([[rng.randrange(10000) for _ in range(1024)]], SamplingParams(max_tokens=1), use_tqdm=False)

    # host-side phase timers
    eng = llm.engine
    phases = defaultdict(float)

    def timed(name, fn):
        def wrap(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                phases[name] += time.perf_counter() - t
        return wrap

    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    import miniinfer.worker.model_runner as mr  # the runner's input packing, by its module-level name
    mr.prepare_inputs = timed("prepare", mr.prepare_inputs)
    spans = []  # (start event, end event, decode-only step?)
    trace: list[dict] = []
    t_gen = [0.0]
    gen_start = torch.cuda.Event(enable_timing=True)
    launch = eng.runner.launch
    if a.timer == "events":
        def launch_with_events(sched, prev):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            h0 = time.perf_counter()
            e0.record()
            out = launch(sched, prev)
            e1.record()
            spans.append((e0, e1, all(s.num_new_tokens == 1 for s in sched.scheduled)))
            if len(trace) < a.trace_steps:
                trace.append({"host_start_ms": (h0 - t_gen[0]) * 1e3, "launch_ms": (time.perf_counter() - h0) * 1e3,
                              "decodes": sum(1 for s in sched.scheduled if s.num_new_tokens == 1),
                              "prefill_seqs": sum(1 for s in sched.scheduled if s.num_new_tokens > 1),
                              "tokens": sum(s.num_new_tokens for s in sched.scheduled), "events": (e0, e1)})
            return out
        eng.runner.launch = launch_with_events
    eng.runner.launch = timed("launch (incl. prepare)", eng.runner.launch)
    eng.runner.collect = timed("collect (wait for the device)", eng.runner.collect)
    process = eng._process
    processed_at: list[float] = []

    def process_logged(*args, **kw):
        if len(processed_at) < a.trace_steps:
            processed_at.append(round((time.perf_counter() - t_gen[0]) * 1e3, 3))
        return process(*args, **kw)
    eng._process = timed("process outputs", process_logged)
    steps = [0]
    step = eng.step

    window = [int(x) for x in a.window.split(":")] if a.window else None
    window_prof = profile(activities=[ProfilerActivity.CUDA]) if window else None

    def count_step():
        steps[0] += 1
        if window and steps[0] == window[0]:
            window_prof.start()
        out = step()
        if window and steps[0] == window[1]:
            torch.cuda.synchronize()
            window_prof.stop()
        return out
    eng.step = count_step

    # Any Triton compile from here on is a specialization the engine's warmup missed.
    import triton
    late_compiles: list[str] = []

    def on_compile(*, repr, **_):
        late_compiles.append(repr[:160])
        return False
    triton.knobs.runtime.jit_cache_hook = on_compile
    torch.cuda.synchronize()
    if a.timer == "events":
        t = t_gen[0] = time.perf_counter()
        gen_start.record()
        res = llm.generate(prompts, p, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        dec = [e0.elapsed_time(e1) for e0, e1, d in spans if d]
        mix = [e0.elapsed_time(e1) for e0, e1, d in spans if not d]
        busy = (sum(dec) + sum(mix)) / 1e3
        result = {
            "device": torch.cuda.get_device_name(0), "model": a.model, "workload": a.workload,
            "timer": "events", "overlap": eng.config.overlap_scheduling,
            "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "steps": steps[0],
            "gpu_busy_fraction": busy / wall, "gpu_idle_fraction": 1 - busy / wall,
            "decode_steps": len(dec), "decode_step_gpu_ms_mean": sum(dec) / max(len(dec), 1),
            "mixed_steps": len(mix), "mixed_step_gpu_ms_mean": sum(mix) / max(len(mix), 1),
            "wall_ms_per_step": wall / max(steps[0], 1) * 1e3,
            "host_ms_per_step": {k: v / max(steps[0], 1) * 1e3 for k, v in phases.items()},
            "late_triton_compiles": late_compiles,
        }
        firsts = [r.metrics["first_token_time"] - r.metrics["arrival_time"] for r in res
                  if r.metrics.get("first_token_time") is not None]
        if firsts:
            result["mean_ttft_ms"] = sum(firsts) / len(firsts) * 1e3
            result["min_ttft_ms"] = min(firsts) * 1e3
        for row in trace:
            e0, e1 = row.pop("events")
            row["gpu_start_ms"] = gen_start.elapsed_time(e0)
            row["gpu_end_ms"] = gen_start.elapsed_time(e1)
        if trace:
            result["trace"] = trace
            result["process_started_at_ms"] = processed_at
        if window:
            n = window[1] - window[0]
            result["window_steps"] = a.window
            result["window_busy_fraction"], result["window_kernels_ms_per_step"] = kernel_table(window_prof, n)
        print(json.dumps(result, indent=2))
        with open(os.path.join(out_dir, f"profile-{a.workload}{a.tag}.json"), "w") as f:
            json.dump(result, f, indent=2)
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # GPU only: CPU tracing would slow the host
        t = time.perf_counter()
        res = llm.generate(prompts, p, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    tokens = sum(len(r.outputs[0].token_ids) for r in res)

    busy_frac, top = kernel_table(prof)
    result = {
        "device": torch.cuda.get_device_name(0), "model": a.model, "batch": a.batch,
        "prompt_len": a.prompt_len, "out_len": a.out_len, "overlap": eng.config.overlap_scheduling,
        "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "steps": steps[0],
        "gpu_busy_fraction": busy_frac, "gpu_idle_fraction": 1 - busy_frac,
        "host_ms_per_step": {k: v / max(steps[0], 1) * 1e3 for k, v in phases.items()},
        "top_kernels": top,
    }
    print(json.dumps(result, indent=2))
    with open(os.path.join(out_dir, f"profile-decode{a.tag}.json"), "w") as f:
        json.dump(result, f, indent=2)


def kernel_table(prof, per: int = 1) -> tuple[float, list[dict]]:
    """(busy fraction of the traced span, top kernels by time; ``ms`` divided by ``per``)."""
    kernels = defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            dur = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            kernels[e.name][0] += dur
            kernels[e.name][1] += 1
            start = e.time_range.start
            intervals.append((start, start + dur))
    intervals.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 1.0
    total = sum(v[0] for v in kernels.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    return busy / span, [{"name": k[:90], "ms": v[0] / 1e3 / per, "calls": v[1] / per, "share": v[0] / total}
                         for k, v in top]


if __name__ == "__main__":
    main()
