"""A/B of two source trees of MiniInfer on the same GPU in one sitting, through the shared
side-by-side harness (``../shared/vllm/sbs_bench.py``, copied to ``.vllm/``).

    python benchmarks/ab_trees.py --a .before --b . --order ab --tasks qwen3_tput qwen2_05b qwen2_7b

Each tree runs the harness's tasks in its own processes (``VB_ENGINE=miniinfer``,
``PYTHONPATH=<tree>``); ``--order ab`` / ``ba`` alternates the trees between calls so drift
hits both. Every result line is appended to ``$OUT/ab.jsonl`` as ``{"tree", "metric", "value"}``;
``--summarize FILE...`` merges such files into medians per tree and the ratio b / a.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_tree(label: str, root: str, tasks: list[str], out_path: str) -> None:
    env = dict(os.environ, VB_ENGINE="miniinfer", PYTHONPATH=os.path.abspath(root), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, ".vllm/sbs_bench.py", *tasks], env=env, capture_output=True,
                          text=True)
    with open(out_path, "a") as f:
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rec["tree"] = label
            f.write(json.dumps(rec) + "\n")
            if rec.get("kind") in ("result", "error", "startup"):
                print(label, json.dumps({k: rec.get(k) for k in ("kind", "task", "metric", "value", "error",
                                                                  "startup_s")}), flush=True)


def summarize(paths: list[str]) -> dict:
    vals: dict[str, dict[str, list]] = {}
    for p in paths:
        for line in open(p):
            rec = json.loads(line)
            if rec.get("kind") == "result" and isinstance(rec.get("value"), (int, float)):
                vals.setdefault(rec["metric"], {}).setdefault(rec["tree"], []).append(rec["value"])
    out = {}
    for metric, by_tree in sorted(vals.items()):
        a, b = by_tree.get("a"), by_tree.get("b")
        row = {"a": a, "b": b}
        if a and b:
            row["a_median"], row["b_median"] = statistics.median(a), statistics.median(b)
            row["b_over_a"] = round(row["b_median"] / row["a_median"], 4)
        out[metric] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a", default=".before")
    p.add_argument("--b", default=".")
    p.add_argument("--order", default="ab", choices=["ab", "ba"])
    p.add_argument("--tasks", nargs="+", default=["qwen3_tput", "qwen2_05b", "qwen2_7b"])
    p.add_argument("--summarize", nargs="*")
    args = p.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize), indent=1))
        return
    out = os.path.join(os.environ.get("OUT", "artifacts"), "ab.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    trees = {"a": args.a, "b": args.b}
    for label in args.order:
        run_tree(label, trees[label], args.tasks, out)
    print(json.dumps(summarize([out]), indent=1))


if __name__ == "__main__":
    main()
