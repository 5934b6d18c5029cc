"""TTFT of fresh random prompts (128 and 1024 tokens), many repeats in one process: what the
shared harness's TTFT measures, with enough repeats to see this machine's per-process modes.

    PYTHONPATH=<tree> python benchmarks/ttft_reps.py LABEL [CONFIG_DIR] [REPS]

Prints one JSON line: per prompt length the median, p10 and min in ms. Run it in several
alternating processes per source tree (the device VMs land a process in a slow mode ~1 in 5,
~+20 %, whatever the code)."""
import json
import os
import random
import statistics
import sys
import time

import torch

from miniinfer import LLM, SamplingParams

label = sys.argv[1]
config = sys.argv[2] if len(sys.argv) > 2 else os.path.join(".vllm", "configs", "Qwen2-0.5B")
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 150
llm = LLM(config, load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.85,
          seed=0, progress=False)
rng = random.Random(1)
one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def ttft_ms(n: int) -> float:
    prompt = [{"prompt_token_ids": [rng.randrange(0, 10000) for _ in range(n)]}]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompt, one, use_tqdm=False)
    return (time.perf_counter() - t) * 1e3


out = {"label": label}
for n in (128, 1024):
    for _ in range(20):
        ttft_ms(n)
    xs = sorted(ttft_ms(n) for _ in range(reps))
    out[n] = {"median": round(statistics.median(xs), 4), "p10": round(xs[reps // 10], 4), "min": round(xs[0], 4)}
print(json.dumps(out), flush=True)
