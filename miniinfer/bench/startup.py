"""§7: first request after start, with warmup on and off, and process start to ready."""
from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
t_import = time.time()
from miniinfer import LLM, SamplingParams
model, warmup = sys.argv[1], sys.argv[2] == "1"
llm = LLM(model, load_format="dummy", max_model_len=4096, warmup=warmup, enforce_eager=not warmup,
          progress=False)
ready = time.time()
prompt = list(range(1000, 1128))
p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
import torch
def timed():
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t = time.perf_counter(); llm.generate([prompt], p, use_tqdm=False)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return (time.perf_counter() - t) * 1e3
first = timed()
steady = sorted(timed() for _ in range(3))[1]
print("RESULT " + json.dumps({"ready": ready, "first_ms": first, "steady_ms": steady}))
"""


def _run(model: str, warmup: bool) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, model, "1" if warmup else "0"],
                         capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[7:])
    r["startup_s"] = r["ready"] - t0
    return r


def startup(model: str = "qwen2-0.5b") -> dict:
    name = model.replace("-", "_")
    m = {}
    for warm in (True, False):
        r = _run(model, warm)
        tag = "" if warm else "_nowarmup"
        m[f"first_request_ms{tag}"] = r["first_ms"]
        m[f"steady_request_ms{tag}"] = r["steady_ms"]
        m[f"first_over_steady{tag}"] = r["first_ms"] / r["steady_ms"]
        m[f"{name}_startup_s{tag}"] = r["startup_s"]
    return m
