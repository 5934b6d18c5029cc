"""Timeline of speculative steps with a JSON schema, grammar-mask overlap on and off (issue #14):
where the host's grammar work sits relative to the verify forward's kernels.

The embedded SmolLM2 with its EAGLE head (a tree: depth ``--k``, ``--topk`` branches, ``--nodes``
verified), ``--batch`` chat prompts of §12 (``spec_grammar_bench.prompt_texts``), the §10 schema,
greedy, ``--max-tokens``. For each mode (``overlap``: the verify mask is filled while the verify
forward runs; ``serial``: ``StructuredOutputManager.overlap = False``, the fill waits for it) one
``generate`` runs under ``torch.profiler`` (CPU + CUDA), with the engine's step phases labelled by
``record_function`` (wrapped here, the engine is not changed): ``draft`` (the proposer),
``forward`` (the verify forward's launch), ``mask_fill`` (``fill_verify_bitmask``), ``sample``
(the acceptance launch; the fill runs inside it), ``collect`` (waiting for the accepted ids), ``process``.
With the fused EAGLE step (CUDA default, ``MINIINFER_SPEC_FUSED=0``: off) ``draft`` is its staging,
``forward`` its launch (draft, verify and accept graphs; the fill, ``FusedEagleDriver._fill``, inside).

Output (``--out``): per mode, the labelled host intervals and the GPU's busy intervals (kernels
merged) of ``--steps`` consecutive verify steps from the middle of the run, in µs from the first
one's start, and over every verify step of the run: mean step time, mean mask fill, and the share
of the fill that ran while the GPU was busy (``fill_under_gpu_frac``). ``--plot-from FILE --png
OUT`` draws a result (docs/img/spec_grammar_timeline.png)::

    source benchmarks/device_setup.sh env && python3 benchmarks/spec_grammar_timeline.py \\
        --out benchmarks/results/<date>-spec-grammar-timeline-h200.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LABELS = ("draft", "forward", "mask_fill", "sample", "collect", "process")


def _label(obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        with torch.profiler.record_function(label):
            return fn(*a, **kw)
    setattr(obj, name, wrapped)


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _overlap(a: tuple[float, float], busy: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a[1], e) - max(a[0], s)) for s, e in busy)


def profile_mode(llm, prompts, params, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
    host = {k: [] for k in LABELS}
    kernels = []
    for ev in prof.events():
        tr = ev.time_range
        if ev.name in host and ev.device_type.name == "CPU":
            host[ev.name].append((tr.start, tr.end))
        elif ev.device_type.name == "CUDA" and ev.name not in host and not getattr(ev, "is_user_annotation", False):
            kernels.append((tr.start, tr.end))  # kernels and copies (a label's GPU mirror is not work)
    busy = _merge(kernels)
    for k in host:
        host[k].sort()
    fills = host["mask_fill"]
    drafts = host["draft"]
    # a verify step: from a draft's start to the next draft's start
    bounds = [(drafts[i][0], drafts[i + 1][0]) for i in range(len(drafts) - 1)]
    step_us = [e - s for s, e in bounds]
    fill_us = [e - s for s, e in fills]
    under = sum(_overlap(f, busy) for f in fills) / max(sum(fill_us), 1e-9)
    mid = max(0, len(bounds) // 2 - steps // 2)
    t0, t1 = bounds[mid][0], bounds[min(len(bounds) - 1, mid + steps - 1)][1]
    window = {k: [(s - t0, e - t0) for s, e in v if s < t1 and e > t0] for k, v in host.items()}
    window["gpu"] = [(max(s, t0) - t0, min(e, t1) - t0) for s, e in busy if s < t1 and e > t0]
    gpu_in_steps = sum(_overlap(b, busy) for b in bounds) / max(sum(step_us), 1e-9)
    return {"verify_steps": len(bounds), "step_us_mean": sum(step_us) / max(len(step_us), 1),
            "mask_fill_us_mean": sum(fill_us) / max(len(fill_us), 1), "fill_under_gpu_frac": under,
            "gpu_busy_frac_of_steps": gpu_in_steps, "window_us": t1 - t0,
            "window": {k: [[round(s, 1), round(e, 1)] for s, e in v] for k, v in window.items()}}


COLORS = {"draft": "tab:purple", "forward": "tab:blue", "mask_fill": "tab:red", "sample": "tab:orange",
          "collect": "tab:gray", "process": "tab:green", "gpu": "black"}


def plot(result: dict, png: str) -> None:
    """One panel per mode: a lane per host phase and one for the GPU's busy time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    windows = result["details"]["windows"]
    fig, axes = plt.subplots(len(windows), 1, figsize=(12, 2.2 * len(windows)), squeeze=False)
    lanes = list(LABELS) + ["gpu"]
    for ax, (mode, win) in zip(axes[:, 0], windows.items()):
        for y, lane in enumerate(lanes):
            bars = [(s / 1e3, (e - s) / 1e3) for s, e in win.get(lane, [])]
            ax.broken_barh(bars, (y - 0.4, 0.8), color=COLORS[lane])
        m = result["metrics"]
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_title(f"{mode}: step {m[f'{mode}_step_us_mean'] / 1e3:.2f} ms mean, mask fill "
                     f"{m[f'{mode}_mask_fill_us_mean']:.0f} µs, {100 * m[f'{mode}_fill_under_gpu_frac']:.0f} % "
                     f"of it under GPU work", fontsize=9)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("ms")
    fig.suptitle(f"EAGLE tree verify steps with a JSON schema, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot-from", default=None, help="a result JSON to draw (no run)")
    ap.add_argument("--png", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="verify steps kept in the window")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            result = json.load(f)
        plot(result, args.png or "spec_grammar_timeline.png")
        return result
    from miniinfer import LLM, SamplingParams
    from miniinfer.sampling_params import StructuredOutputsParams
    import spec_grammar_bench as sgb
    import structured_output_bench as sob

    spec = {"method": "eagle", "num_speculative_tokens": args.k, "eagle_topk": args.topk,
            "num_draft_tokens": args.nodes}
    cuda = torch.cuda.is_available()  # on a CPU: a smoke run (no GPU lane)
    llm = LLM(None, speculative_config=spec, dtype="bfloat16" if cuda else "float32", max_model_len=1024,
              progress=False, seed=0)
    eng = llm.engine
    prompts = [eng.apply_chat_template([{"role": "user", "content": x}]) for x in sgb.prompt_texts(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                            structured_outputs=StructuredOutputsParams(json=sob.SCHEMA))
    so = eng.structured_output
    _label(eng.proposer, "propose_for", "draft")
    _label(eng.runner, "forward", "forward")
    _label(so, "fill_verify_bitmask", "mask_fill")
    if getattr(eng.proposer, "fused", None) is not None:  # the fused step: launch = draft + verify + accept
        _label(eng.proposer.fused, "_fill", "mask_fill")
        _label(eng.proposer.fused, "launch", "forward")
    _label(eng.runner, "sample", "sample")
    _label(eng.runner, "collect", "collect")
    _label(eng, "_process", "process")
    llm.generate(prompts, params, use_tqdm=False)  # warm-up (graphs, Triton, grammar)
    modes = {}
    for mode, overlap in (("overlap", True), ("serial", False)):
        so.overlap = overlap
        modes[mode] = profile_mode(llm, prompts, params, args.steps)
        print(mode, {k: v for k, v in modes[mode].items() if k != "window"}, flush=True)
    so.overlap = True
    metrics = {f"{m}_{k}": v for m, r in modes.items() for k, v in r.items() if k != "window"}
    metrics["step_us_cut"] = 1 - metrics["overlap_step_us_mean"] / metrics["serial_step_us_mean"]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": datetime.date.today().isoformat(),
              "command": " ".join(["python3"] + sys.argv), "metrics": metrics,
              "details": {"spec": spec, "batch": args.batch, "windows": {m: r["window"] for m, r in modes.items()}}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
