"""Host and device cost of one long prefill step: where does the host spend its time?

    python benchmarks/profile_step.py [--model qwen2-0.5b] [--tokens 2112]

Runs ``generate`` on a fresh random prompt (max_tokens=1) under ``torch.profiler`` with CPU
and CUDA activity and prints the top ops by host (self CPU) time and by device time."""
from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from miniinfer import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2-0.5b")
    ap.add_argument("--tokens", type=int, default=2112)
    a = ap.parse_args()
    llm = LLM(a.model, load_format="dummy", max_model_len=4096, progress=False)
    rng = random.Random(0)
    p = SamplingParams(temperature=0, max_tokens=1)

    def fresh():
        return [[rng.randrange(10000) for _ in range(a.tokens)]]
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(fresh(), p, use_tqdm=False)
        torch.cuda.synchronize()
        print(f"generate({a.tokens} tokens, 1 output): {(time.perf_counter() - t) * 1e3:.2f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(fresh(), p, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
