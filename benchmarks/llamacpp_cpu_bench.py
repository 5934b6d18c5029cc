"""llama.cpp side by side with MiniInfer on this CPU (issue #17; docs/BENCHMARKS.md §8 "llama.cpp side by side").

    python benchmarks/llamacpp_cpu_bench.py \\
        --llama-bench avx512=/tmp/llamacpp-native/bin/llama-bench \\
        --llama-bench avx2=/tmp/llamacpp-avx2/bin/llama-bench \\
        [--threads 2 1] [--reps 3] [--rounds 1] [--json out.json]

Building llama.cpp without GitHub (as on 2026-11-30: llama-cpp-python 0.3.36 = ggml-org/llama.cpp@0c1e57098):

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    S=llama_cpp_python-*/vendor/llama.cpp
    cmake -S $S -B /tmp/llamacpp-native -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake -S $S -B /tmp/llamacpp-avx2 -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
        -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
    cmake --build /tmp/llamacpp-native --target llama-bench -j2   # and the same for /tmp/llamacpp-avx2
    # optional Q4_0 reference: --target llama-quantize, then
    # llama-quantize --allow-requantize MODEL /tmp/smollm2-requant-Q4_0.gguf Q4_0

Both sides run the embedded SmolLM2-135M-Instruct Q4_1 GGUF on the CPU with T threads:

* llama.cpp: ``llama-bench -m MODEL -t T -p 512 -n 128 -r REPS -o json``: pp512 (prefill of 512
  tokens from an empty context, tok/s) and tg128 (batch-1 decode of 128 tokens, tok/s). Each
  ``--llama-bench LABEL=PATH`` is one build; LABEL names the ISA it was built for
  (``avx512``: ``-DGGML_NATIVE=ON`` on an AVX-512 CPU; ``avx2``: native off, AVX/AVX2/FMA/F16C on,
  AVX-512 off), and MiniInfer runs with ``MINIINFER_CPU_ISA=LABEL`` next to it.
* MiniInfer: ``LLM(None, dtype="float32")`` (the default CPU path: GGUF Q4_1/Q8_0 C kernels),
  in a fresh process per (ISA, threads, int8) with ``MINIINFER_CPU_ISA``, ``OMP_NUM_THREADS``
  (the C kernels' OpenMP) and ``torch.set_num_threads`` set to T; with
  ``cpu_int8_activations`` off (default) and on. Prefill: ``generate`` of one 512-token prompt
  (random token ids, new ones each rep so the prefix cache never hits) with ``max_tokens=1``,
  512 / wall. Decode: one chat prompt (~30 tokens), ``max_tokens=128, ignore_eos=True``, greedy;
  127 / (finished_time - first_token_time), i.e. the 127 decode steps after the first token.
  One warmup of each before REPS timed runs; the median is reported (llama-bench's samples are
  reduced to their median too).

Rounds interleave the sides per ISA and thread count (llama.cpp, ours, ours int8) so that drift
of this shared machine hits both. Metric names: ``llamacpp_{pp512,tg128}_tok_s_{isa}_t{T}``,
``miniinfer_{prefill,decode}_tok_s_{isa}_t{T}`` (``..._int8_...`` with int8 activations),
``{prefill,decode}_ratio_vs_llamacpp_{isa}_t{T}`` = ours / llama.cpp (``..._int8_...`` too).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time


def model_path() -> str:
    from miniinfer.loader.embedded import embedded_model_path
    return embedded_model_path()


def llama_bench(binary: str, model: str, threads: int, reps: int) -> dict:
    out = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", "512", "-n", "128",
                          "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True).stdout
    res = {}
    for row in json.loads(out):
        name = "pp512" if row["n_prompt"] == 512 else "tg128"
        res[name] = statistics.median(row["samples_ts"])
        res[name + "_mean"] = row["avg_ts"]
        res[name + "_std"] = row["stddev_ts"]
        res["build_commit"] = row.get("build_commit")
        res["build_number"] = row.get("build_number")
        res["cpu_info"] = row.get("cpu_info")
    return res


def _worker(threads: int, int8: bool, reps: int) -> dict:
    """Runs in the child process (ISA and OMP_NUM_THREADS come from the environment)."""
    import random

    import torch

    from miniinfer import LLM, SamplingParams
    from miniinfer.kernels import cpu_kernels

    torch.set_num_threads(threads)
    llm = LLM(None, dtype="float32", progress=False, cpu_int8_activations=int8)
    rng = random.Random(0)

    def prefill() -> float:
        ids = [rng.randrange(100, 49000) for _ in range(512)]
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        return 512 / (time.perf_counter() - t)

    chat = llm.engine.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}])
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

    def decode() -> float:
        r = llm.generate([chat], sp, use_tqdm=False)[0]
        n = len(r.outputs[0].token_ids)
        assert n == 128, n
        return (n - 1) / (r.metrics["finished_time"] - r.metrics["first_token_time"])

    prefill(), decode()  # warmup
    pre = [prefill() for _ in range(reps)]
    dec = [decode() for _ in range(reps)]
    return {"prefill": statistics.median(pre), "prefill_samples": pre, "decode": statistics.median(dec),
            "decode_samples": dec, "isa": cpu_kernels.isa(), "int8_kernel": cpu_kernels.int8_kernel() if int8 else None,
            "torch_threads": torch.get_num_threads()}


def miniinfer(isa: str, threads: int, int8: bool, reps: int) -> dict:
    env = {**os.environ, "MINIINFER_CPU_ISA": isa, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(int(int8)), str(reps)],
                         env=env, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if res["isa"] != isa:
        raise RuntimeError(f"asked for the {isa} path, ran {res['isa']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", action="append", default=[], metavar="ISA=PATH", help="a llama-bench binary")
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole interleaved set; medians over rounds")
    ap.add_argument("--no-int8", action="store_true", help="skip the cpu_int8_activations runs")
    ap.add_argument("--llama-extra-model", action="append", default=[], metavar="LABEL=PATH",
                    help="llama.cpp only: the same model in another GGUF type (e.g. q4_0=smollm2-q4_0.gguf, made by "
                         "llama-quantize --allow-requantize MODEL OUT Q4_0), llama.cpp's reference on its best path")
    ap.add_argument("--json", help="write {device, date, command, metrics} here")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        t, i8, r = map(int, a.worker)
        print(json.dumps(_worker(t, bool(i8), r)))
        return
    builds = dict(x.split("=", 1) for x in a.llama_bench)
    extras = dict(x.split("=", 1) for x in a.llama_extra_model)
    if not builds:
        ap.error("give at least one --llama-bench ISA=PATH")
    model = model_path()
    raw: dict[str, list[float]] = {}
    details: dict = {"model": model, "loadavg_before": os.getloadavg()}

    def add(key, value):
        raw.setdefault(key, []).append(value)
        print(f"{key} = {value:.1f}", flush=True)

    for rnd in range(a.rounds):
        for threads in a.threads:
            for isa, binary in builds.items():
                sfx = f"{isa}_t{threads}"
                ll = llama_bench(binary, model, threads, a.reps)
                details.setdefault("llamacpp", {})[f"{sfx}_round{rnd}"] = ll
                add(f"llamacpp_pp512_tok_s_{sfx}", ll["pp512"])
                add(f"llamacpp_tg128_tok_s_{sfx}", ll["tg128"])
                for label, path in extras.items():
                    lx = llama_bench(binary, path, threads, a.reps)
                    details["llamacpp"][f"{label}_{sfx}_round{rnd}"] = lx
                    add(f"llamacpp_{label}_pp512_tok_s_{sfx}", lx["pp512"])
                    add(f"llamacpp_{label}_tg128_tok_s_{sfx}", lx["tg128"])
                for int8 in ([False] if a.no_int8 else [False, True]):
                    tag = f"{isa}_int8_t{threads}" if int8 else sfx
                    ours = miniinfer(isa, threads, int8, a.reps)
                    details.setdefault("miniinfer", {})[f"{tag}_round{rnd}"] = ours
                    add(f"miniinfer_prefill_tok_s_{tag}", ours["prefill"])
                    add(f"miniinfer_decode_tok_s_{tag}", ours["decode"])
    details["loadavg_after"] = os.getloadavg()
    m = {k: statistics.median(v) for k, v in raw.items()}
    for threads in a.threads:
        for isa in builds:
            for tag in (f"{isa}_t{threads}", f"{isa}_int8_t{threads}"):
                if f"miniinfer_decode_tok_s_{tag}" not in m:
                    continue
                m[f"decode_ratio_vs_llamacpp_{tag}"] = (m[f"miniinfer_decode_tok_s_{tag}"]
                                                        / m[f"llamacpp_tg128_tok_s_{isa}_t{threads}"])
                m[f"prefill_ratio_vs_llamacpp_{tag}"] = (m[f"miniinfer_prefill_tok_s_{tag}"]
                                                         / m[f"llamacpp_pp512_tok_s_{isa}_t{threads}"])
                for label in extras:  # ours on the Q4_1 file vs llama.cpp on its own best type
                    ll = f"llamacpp_{label}"
                    m[f"decode_ratio_vs_{ll}_{tag}"] = (m[f"miniinfer_decode_tok_s_{tag}"]
                                                        / m[f"{ll}_tg128_tok_s_{isa}_t{threads}"])
                    m[f"prefill_ratio_vs_{ll}_{tag}"] = (m[f"miniinfer_prefill_tok_s_{tag}"]
                                                         / m[f"{ll}_pp512_tok_s_{isa}_t{threads}"])
    for k, v in m.items():
        print(f"{k:50s} {v:9.2f}")
    if a.json:
        from miniinfer.bench.common import device_name
        result = {"device": device_name(), "date": datetime.date.today().isoformat(),
                  "command": "python benchmarks/llamacpp_cpu_bench.py " + " ".join(sys.argv[1:]),
                  "metrics": m, "details": details}
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
