"""``miniinfer bench <name>``: run one benchmark, print JSON, optionally write it (--json)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="miniinfer bench")
    p.add_argument("name", choices=["throughput", "latency", "sweep", "prefix", "startup", "overlap", "cpu",
                                    "serve"])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the result file here")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF transformers baseline")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--hf-num-requests", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="cpu: interleaved timed runs of ours and HF")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-overlap", dest="overlap_scheduling", action="store_false")
    p.set_defaults(overlap_scheduling=True)
    if argv[:1] == ["serve"]:
        from miniinfer.bench.serve import main as serve_main
        return serve_main(argv[1:])
    a, rest = p.parse_known_args(argv)
    from miniinfer.bench import offline
    from miniinfer.bench.common import write_result
    kw = dict(device=a.device, enforce_eager=a.enforce_eager, overlap_scheduling=a.overlap_scheduling)
    if a.name == "cpu":
        kw["device"] = "cpu"
        m = offline.cpu(max_tokens=a.max_tokens, hf=a.hf, repeats=a.repeats, **kw)
    elif a.name == "throughput":
        m = offline.throughput(a.model or "qwen3-0.6b", a.num_requests, a.hf_num_requests, a.hf, **kw)
    elif a.name == "latency":
        m = offline.latency(a.model or "qwen2-0.5b", hf=a.hf, **kw)
    elif a.name == "sweep":
        m = offline.sweep(a.model or "qwen2-0.5b", **kw)
    elif a.name == "prefix":
        m = offline.prefix_cache(a.model or "qwen2-0.5b", **kw)
    elif a.name == "overlap":
        kw.pop("overlap_scheduling")
        m = offline.overlap_ablation(a.model or "qwen3-0.6b", **kw)
    elif a.name == "startup":
        from miniinfer.bench.startup import startup
        m = startup(a.model or "qwen2-0.5b")
    else:
        print(f"bench {a.name}: not implemented yet", file=sys.stderr)
        return 2
    write_result(a.json, m)
    return 0
