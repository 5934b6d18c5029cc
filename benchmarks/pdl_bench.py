"""Programmatic dependent launch (``kernels/pdl.py``) A/B at batch 1 (#16), baseline in the same
process: PDL off and on. (The session-12 run, commit 8e4616b, also had variants with an L2 prefetch
of each GEMV program's first weight chunks, since removed: slower.)

    python benchmarks/pdl_bench.py [--models qwen2-7b,qwen2-0.5b] [--rounds 3] [--json PATH]

One engine per model (dummy bf16 weights, ``max_num_seqs=16`` so that a re-capture is quick);
for each variant the CUDA graphs are captured again with the switch flipped, then measured:
the device time of one replay of the batch-1 decode graph at a 256-token context (CUDA events,
mean of 200 replays) and the batch-1 TPOT of a 128-token prompt with 256 greedy tokens
(``bench.offline.latency``'s method: wall of the generation minus a 1-token one, over 255).
Variants alternate for ``--rounds`` rounds; medians are reported, with each variant's ratio to
PDL off and, for Qwen2-7B, to the bandwidth limit (all weight bytes at a device-to-device copy's
best rate, measured in the same process).
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics

import torch

from miniinfer.bench.common import device_ms, median_time, write_result
from miniinfer.bench.offline import _llm, hbm_bandwidth
from miniinfer.kernels import _common
from miniinfer.sampling_params import SamplingParams

VARIANTS = {"off": False, "pdl": True}


def _recapture(runner, pdl: bool) -> None:
    _common.PDL = pdl
    runner.cuda_graphs = None
    gc.collect()
    torch.cuda.empty_cache()
    runner.capture_cuda_graphs()


def _decode_graph_ms(runner) -> float:
    graphs = runner.cuda_graphs
    graphs.attn.seq_lens[:1].fill_(256)
    ms = device_ms(graphs.decode[1][0], 200)
    graphs.attn.reset()
    return ms


def _tpot_ms(llm, rng: random.Random, vocab: int) -> float:
    def run(n: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate([[rng.randrange(vocab) for _ in range(128)]], params, use_tqdm=False)
    return (median_time(lambda: run(256)) - median_time(lambda: run(1))) / 255 * 1e3


def bench_model(model: str, rounds: int) -> dict:
    llm = _llm(model, max_num_seqs=16)
    runner = llm.engine.runner
    vocab = min(llm.engine.model_config.vocab_size, 10000)
    rng = random.Random(0)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    samples: dict[str, dict[str, list[float]]] = {v: {"graph": [], "tpot": []} for v in VARIANTS}
    for r in range(rounds):
        for name, pdl in VARIANTS.items():
            _recapture(runner, pdl)
            llm.generate([[1] * 16], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm
            samples[name]["graph"].append(_decode_graph_ms(runner))
            samples[name]["tpot"].append(_tpot_ms(llm, rng, vocab))
            print(f"[{model} round {r}] {name}: graph {samples[name]['graph'][-1]:.4f} ms, "
                  f"tpot {samples[name]['tpot'][-1]:.4f} ms", flush=True)
    _recapture(runner, _common.os.environ.get("MINIINFER_PDL", "1") != "0")
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    key = model.replace("-", "_").replace(".", "_")
    m: dict = {}
    base_graph = statistics.median(samples["off"]["graph"])
    base_tpot = statistics.median(samples["off"]["tpot"])
    for name, s in samples.items():
        g, t = statistics.median(s["graph"]), statistics.median(s["tpot"])
        m[f"{key}_bs1_decode_graph_ms_{name}"] = g
        m[f"{key}_bs1_tpot_ms_{name}"] = t
        m[f"{key}_bs1_decode_graph_ratio_{name}_vs_off"] = g / base_graph
        m[f"{key}_bs1_tpot_ratio_{name}_vs_off"] = t / base_tpot
    m[f"{key}_weight_bytes"] = weight_bytes
    m[f"{key}_samples"] = samples
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen2-7b,qwen2-0.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    bw = hbm_bandwidth()
    metrics: dict = {}
    for model in args.models.split(","):
        metrics.update(bench_model(model, args.rounds))
    metrics["hbm_bandwidth_gb_s"] = bw / 1e9
    for model in args.models.split(","):
        key = model.replace("-", "_").replace(".", "_")
        limit_ms = metrics[f"{key}_weight_bytes"] / bw * 1e3
        metrics[f"{key}_bs1_roofline_ms"] = limit_ms
        for name in VARIANTS:
            metrics[f"{key}_bs1_roofline_ratio_{name}"] = metrics[f"{key}_bs1_tpot_ms_{name}"] / limit_ms
    write_result(args.json, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
