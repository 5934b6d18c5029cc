"""One entry point for the GPU machine: GPU tests, then every GPU benchmark, JSON to $OUT.

    python benchmarks/gpu_suite.py [--only a,b] [--skip c,d]    (OUT defaults to ./artifacts/gpu)

Each step runs in its own process with a time limit, so one failure doesn't stop the rest."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT") or os.path.join("artifacts", "gpu")
BENCH = [sys.executable, "-m", "miniinfer.entrypoints.cli", "bench"]

STEPS = {
    "tests": ([sys.executable, "-m", "pytest", "-q", "-x", "tests/kernels", "tests/gpu", "-p", "no:cacheprovider",
               "--junitxml", f"{OUT}/gpu-tests.xml"], 420),
    "gpu-correctness": ([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         "tests/gpu/test_gpu_parity.py::test_greedy_identical_fp32",
                         "tests/kernels/test_kernel_triton_backend.py"], 240),
    "kernel-bench": ([sys.executable, "benchmarks/kernel_bench.py"], 300),
    "gemv-bench": ([sys.executable, "benchmarks/gemv_bench.py", "--budget-s", "100"], 240),  # $OUT/gemv-bench.json
    "prefill-attn-bench": ([sys.executable, "benchmarks/prefill_attn_bench.py", "--budget-s", "110"], 240),
    "allreduce-fused": ([sys.executable, "benchmarks/allreduce_bench.py", "--mode", "all",  # needs 2 GPUs
                         "--out", f"{OUT}/allreduce-fused-norm.json"], 180),
    "attention-tests": ([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         "tests/kernels/test_kernel_attention.py", "tests/kernels/test_kernel_sampling.py",
                         "tests/gpu/test_gpu_parity.py::test_seeded_sampling_on_gpu_ignores_batch_mates",
                         "tests/gpu/test_gpu_parity.py::test_greedy_identical_fp32"], 300),
    "profile-tp": ([sys.executable, "benchmarks/profile_decode.py", "--workload=throughput", "--timer=events",
                    "--no-overlap"], 240),
    "profile-tp-overlap": ([sys.executable, "benchmarks/profile_decode.py", "--workload=throughput",
                            "--timer=events", "--overlap", "--tag=-overlap", "--window=400:410"], 240),
    "trace-prefix": ([sys.executable, "benchmarks/profile_decode.py", "--model=qwen2-0.5b", "--workload=prefix",
                      "--timer=events", "--trace-steps=8", "--tag=-trace"], 180),
    "trace-prefix-sync": ([sys.executable, "benchmarks/profile_decode.py", "--model=qwen2-0.5b", "--workload=prefix",
                           "--timer=events", "--trace-steps=8", "--no-overlap", "--tag=-trace-sync"], 180),
    "trace-ttft": ([sys.executable, "benchmarks/profile_decode.py", "--model=qwen2-0.5b", "--workload=ttft1024",
                    "--timer=events", "--trace-steps=4", "--tag=-trace"], 180),
    "trace-ttft-sync": ([sys.executable, "benchmarks/profile_decode.py", "--model=qwen2-0.5b", "--workload=ttft1024",
                         "--timer=events", "--trace-steps=4", "--no-overlap", "--tag=-trace-sync"], 180),
    "overlap": (BENCH + ["overlap", "--json", f"{OUT}/overlap-ablation.json"], 300),
    "profile": ([sys.executable, "benchmarks/profile_decode.py"], 240),
    "profile-overlap": ([sys.executable, "benchmarks/profile_decode.py", "--overlap", "--tag=-overlap"], 240),
    "latency-0.5b": (BENCH + ["latency", "--model", "qwen2-0.5b", "--json", f"{OUT}/latency-qwen2-0.5b.json"], 300),
    "throughput-qwen3": (BENCH + ["throughput", "--model", "qwen3-0.6b", "--hf-num-requests", "16",
                                  "--json", f"{OUT}/throughput-qwen3-0.6b.json"], 420),
    "throughput-qwen2": (BENCH + ["throughput", "--model", "qwen2-0.5b", "--no-hf",
                                  "--json", f"{OUT}/throughput-qwen2-0.5b.json"], 300),
    "latency-7b": (BENCH + ["latency", "--model", "qwen2-7b", "--json", f"{OUT}/latency-qwen2-7b.json"], 400),
    "sweep-0.5b": (BENCH + ["sweep", "--model", "qwen2-0.5b", "--json", f"{OUT}/sweep-qwen2-0.5b.json"], 300),
    "sweep-7b": (BENCH + ["sweep", "--model", "qwen2-7b", "--json", f"{OUT}/sweep-qwen2-7b.json"], 400),
    "prefix": (BENCH + ["prefix", "--model", "qwen2-0.5b", "--json", f"{OUT}/prefix-qwen2-0.5b.json"], 300),
    "startup": (BENCH + ["startup", "--model", "qwen2-0.5b", "--json", f"{OUT}/startup-qwen2-0.5b.json"], 400),
    "startup-7b": (BENCH + ["startup", "--model", "qwen2-7b", "--json", f"{OUT}/startup-qwen2-7b.json"], 500),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=None)
    p.add_argument("--skip", default="")
    a = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    names = a.only.split(",") if a.only else list(STEPS)
    names = [n for n in names if n not in a.skip.split(",")]
    summary = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in names:
        cmd, limit = STEPS[name]
        t = time.time()
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, timeout=limit, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        summary[name] = {"rc": rc, "seconds": round(time.time() - t, 1)}
        print(f"=== {name}: rc={rc} in {summary[name]['seconds']} s", flush=True)
        with open(os.path.join(OUT, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
