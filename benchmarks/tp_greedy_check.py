"""Tensor parallelism keeps the model (shared/BENCHMARKS.md §13): greedy token ids of TP=N
equal TP=1's, with the same shard-consistent dummy weights in fp32 (bf16 reductions in
another order flip near-ties after a few tokens). Each size runs in its own process.

    python benchmarks/tp_greedy_check.py --model qwen2-7b --tp 2 --out result.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys


def child(model: str, tp: int, dtype: str) -> None:
    from miniinfer import LLM, SamplingParams
    llm = LLM(model, load_format="dummy", dtype=dtype, tensor_parallel_size=tp, max_model_len=2048,
              gpu_memory_utilization=0.6, progress=False, seed=0)
    rng = random.Random(99)
    prompts = [[rng.randrange(0, 10000) for _ in range(n)] for n in (17, 64, 200, 500)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    print("IDS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    llm.engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-7b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", type=int, default=None)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.model, args.child, args.dtype)
    ids = {}
    for tp in (1, args.tp):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--out", "-",
                              "--child", str(tp)], capture_output=True, text=True, timeout=400)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("IDS ")]
        if not line:
            raise SystemExit(f"TP={tp} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        ids[tp] = json.loads(line[0][4:])
    same = [a == b for a, b in zip(ids[1], ids[args.tp])]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ids[1], ids[args.tp])]
    doc = {"device": "", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "metrics": {f"{args.model}_tp{args.tp}_greedy_identical_{args.dtype}": all(same),
                       f"{args.model}_tp{args.tp}_greedy_matching_prefix_{args.dtype}": prefix},
           "ids": {str(k): v for k, v in ids.items()}}
    try:
        import torch
        doc["device"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc["metrics"]))


if __name__ == "__main__":
    main()
