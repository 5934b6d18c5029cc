"""llama.cpp side by side with MiniInfer on this CPU (issue #17; docs/BENCHMARKS.md §8 "llama.cpp side by side").

    python benchmarks/llamacpp_cpu_bench.py \\
        --llama-bench avx512=/tmp/llamacpp-native/bin/llama-bench \\
        --llama-bench avx2=/tmp/llamacpp-avx2/bin/llama-bench \\
        [--llama-batched-bench avx512=/tmp/llamacpp-native/bin/llama-batched-bench \\
         --llama-batched-bench avx2=/tmp/llamacpp-avx2/bin/llama-batched-bench] \\
        [--threads 2 1] [--reps 3] [--rounds 1] [--json out.json]

Building llama.cpp without GitHub (as on 2026-11-30: llama-cpp-python 0.3.36 = ggml-org/llama.cpp@0c1e57098):

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    S=llama_cpp_python-*/vendor/llama.cpp
    cmake -S $S -B /tmp/llamacpp-native -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake -S $S -B /tmp/llamacpp-avx2 -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
        -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
    cmake --build /tmp/llamacpp-native --target llama-bench llama-batched-bench -j2   # the same for /tmp/llamacpp-avx2
    # optional Q4_0 reference: --target llama-quantize, then
    # llama-quantize --allow-requantize MODEL /tmp/smollm2-requant-Q4_0.gguf Q4_0

Both sides run the embedded SmolLM2-135M-Instruct Q4_1 GGUF on the CPU with T threads:

* llama.cpp: ``llama-bench -m MODEL -t T -p 512,40 -n 128 -r REPS -o json``: pp512 (prefill of 512
  tokens from an empty context, tok/s), pp40 (the same for 40 tokens, reported as ms = 40 / tok/s)
  and tg128 (batch-1 decode of 128 tokens, tok/s). Each
  ``--llama-bench LABEL=PATH`` is one build; LABEL names the ISA it was built for
  (``avx512``: ``-DGGML_NATIVE=ON`` on an AVX-512 CPU; ``avx2``: native off, AVX/AVX2/FMA/F16C on,
  AVX-512 off), and MiniInfer runs with ``MINIINFER_CPU_ISA=LABEL`` next to it.
  With ``--llama-batched-bench LABEL=PATH`` (same LABELs) also the §8 shape end to end:
  ``llama-batched-bench -m MODEL -t T -tb T -c 2048 -b 2048 -ub 512 -npp 40 -ntg 64 -npl 16
  --output-format jsonl``, REPS times: 16 sequences, each its own 40-token prompt
  (``is_pp_shared`` 0) and 64 new tokens; e2e16 = 16 x 64 / t (t: prompts + generation), median.
* MiniInfer: ``LLM(None, dtype="float32")`` (the default CPU path: GGUF Q4_1/Q8_0 C kernels),
  in a fresh process per (ISA, threads, int8) with ``MINIINFER_CPU_ISA``, ``OMP_NUM_THREADS``
  (the C kernels' OpenMP) and ``torch.set_num_threads`` set to T; with
  ``cpu_int8_activations`` off (default) and on; ``enable_prefix_caching=False`` (nothing is
  reused across runs, as in llama.cpp's). Prefill: ``generate`` of one 512-token prompt
  (random token ids, new ones each rep) with ``max_tokens=1``, 512 / wall; prefill40: the same
  with a 40-token prompt, wall in ms. Decode: one chat prompt (~30 tokens), ``max_tokens=128, ignore_eos=True``, greedy;
  127 / (finished_time - first_token_time), i.e. the 127 decode steps after the first token.
  e2e16 (only with a batched-bench for that ISA): the 16 §8 chat prompts (``CPU_QUESTIONS``,
  34-41 tokens with the chat template) in one ``generate``, ``max_tokens=64, ignore_eos=True``,
  greedy: 1,024 / wall.
  One warmup of each before REPS timed runs; the median is reported (llama-bench's samples are
  reduced to their median too).

Rounds interleave the sides per ISA and thread count (llama.cpp, ours, ours int8) so that drift
of this shared machine hits both. Metric names: ``llamacpp_{pp512,tg128}_tok_s_{isa}_t{T}``,
``miniinfer_{prefill,decode}_tok_s_{isa}_t{T}`` (``..._int8_...`` with int8 activations),
``{prefill,decode}_ratio_vs_llamacpp_{isa}_t{T}`` = ours / llama.cpp (``..._int8_...`` too);
``llamacpp_pp40_ms_...`` / ``miniinfer_prefill40_ms_...`` and ``prefill40_ratio_vs_llamacpp_...`` =
llama.cpp ms / ours ms; ``llamacpp_batched_e2e16_tok_s_...`` / ``miniinfer_e2e16_tok_s_...`` and
``e2e16_ratio_vs_llamacpp_...`` = ours / llama.cpp (all: > 1 means ours is faster).
With ``--llama-extra-model LABEL=PATH`` each llama.cpp number also as ``llamacpp_LABEL_...`` and
each ratio also as ``..._ratio_vs_llamacpp_LABEL_...``.
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


def device() -> str:
    from miniinfer.bench.common import cpu_device_description
    return cpu_device_description()


def model_path() -> str:
    from miniinfer.loader.embedded import embedded_model_path
    return embedded_model_path()


def llama_bench(binary: str, model: str, threads: int, reps: int) -> dict:
    out = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", "512,40", "-n", "128",
                          "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True).stdout
    res = {}
    for row in json.loads(out):
        name = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        res[name] = statistics.median(row["samples_ts"])
        res[name + "_mean"] = row["avg_ts"]
        res[name + "_std"] = row["stddev_ts"]
        res["build_commit"] = row.get("build_commit")
        res["build_number"] = row.get("build_number")
        res["cpu_info"] = row.get("cpu_info")
    res["pp40_ms"] = 40e3 / res["pp40"]
    return res


def llama_batched_bench(binary: str, model: str, threads: int, reps: int) -> dict:
    """16 x (40-token prompt + 64 new tokens), llama-batched-bench's own timing of the whole batch."""
    runs = []
    for _ in range(reps):
        out = subprocess.run([binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", "2048",
                              "-b", "2048", "-ub", "512", "-npp", "40", "-ntg", "64", "-npl", "16",
                              "--output-format", "jsonl"], check=True, capture_output=True, text=True).stdout
        runs += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    walls = [r["t"] for r in runs]
    return {"e2e16": 16 * 64 / statistics.median(walls), "wall_s": walls, "runs": runs}


def _worker(threads: int, int8: bool, reps: int, e2e: bool) -> dict:
    """Runs in the child process (ISA and OMP_NUM_THREADS come from the environment)."""
    import random

    import torch

    from miniinfer import LLM, SamplingParams
    from miniinfer.kernels import cpu_kernels

    torch.set_num_threads(threads)
    llm = LLM(None, dtype="float32", progress=False, cpu_int8_activations=int8, enable_prefix_caching=False)
    rng = random.Random(0)

    def prefill(n: int = 512) -> float:
        ids = [rng.randrange(100, 49000) for _ in range(n)]
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        return time.perf_counter() - t

    chat = llm.engine.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}])
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

    def decode() -> float:
        r = llm.generate([chat], sp, use_tqdm=False)[0]
        n = len(r.outputs[0].token_ids)
        assert n == 128, n
        return (n - 1) / (r.metrics["finished_time"] - r.metrics["first_token_time"])

    from miniinfer.bench.offline import CPU_QUESTIONS
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in CPU_QUESTIONS]
    sp16 = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    def e2e16() -> float:
        t = time.perf_counter()
        res = llm.generate(prompts, sp16, use_tqdm=False)
        w = time.perf_counter() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        assert n == 16 * 64, n
        return n / w

    prefill(), prefill(40), decode()  # warmup
    if e2e:
        e2e16()
    pre = [512 / prefill() for _ in range(reps)]
    pre40 = [prefill(40) * 1e3 for _ in range(reps)]
    dec = [decode() for _ in range(reps)]
    res = {"prefill": statistics.median(pre), "prefill_samples": pre, "prefill40_ms": statistics.median(pre40),
           "prefill40_ms_samples": pre40, "decode": statistics.median(dec), "decode_samples": dec,
           "isa": cpu_kernels.isa(), "int8_kernel": cpu_kernels.int8_kernel() if int8 else None,
           "torch_threads": torch.get_num_threads()}
    if e2e:
        tok = llm.engine.tokenizer
        e2e_s = [e2e16() for _ in range(reps)]
        res.update(e2e16=statistics.median(e2e_s), e2e16_samples=e2e_s,
                   e2e16_prompt_tokens=[len(tok.encode(p, add_special_tokens=False)) for p in prompts])
    return res


def miniinfer(isa: str, threads: int, int8: bool, reps: int, e2e: bool) -> dict:
    env = {**os.environ, "MINIINFER_CPU_ISA": isa, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(int(int8)), str(reps), str(int(e2e))],
                         env=env, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if res["isa"] != isa:
        raise RuntimeError(f"asked for the {isa} path, ran {res['isa']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", action="append", default=[], metavar="ISA=PATH", help="a llama-bench binary")
    ap.add_argument("--llama-batched-bench", action="append", default=[], metavar="ISA=PATH",
                    help="a llama-batched-bench binary of the same build: adds the 16-sequence e2e16 workload")
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole interleaved set; medians over rounds")
    ap.add_argument("--no-int8", action="store_true", help="skip the cpu_int8_activations runs")
    ap.add_argument("--llama-extra-model", action="append", default=[], metavar="LABEL=PATH",
                    help="llama.cpp only: the same model in another GGUF type (e.g. q4_0=smollm2-q4_0.gguf, made by "
                         "llama-quantize --allow-requantize MODEL OUT Q4_0), llama.cpp's reference on its best path")
    ap.add_argument("--json", help="write {device, date, command, metrics} here")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        t, i8, r, e2e = map(int, a.worker)
        print(json.dumps(_worker(t, bool(i8), r, bool(e2e))))
        return
    builds = dict(x.split("=", 1) for x in a.llama_bench)
    batched = dict(x.split("=", 1) for x in a.llama_batched_bench)
    if set(batched) - set(builds):
        ap.error("each --llama-batched-bench ISA needs a --llama-bench of the same ISA")
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
                add(f"llamacpp_pp40_ms_{sfx}", ll["pp40_ms"])
                if isa in batched:
                    lb = llama_batched_bench(batched[isa], model, threads, a.reps)
                    details.setdefault("llamacpp_batched", {})[f"{sfx}_round{rnd}"] = lb
                    add(f"llamacpp_batched_e2e16_tok_s_{sfx}", lb["e2e16"])
                for label, path in extras.items():
                    lx = llama_bench(binary, path, threads, a.reps)
                    details["llamacpp"][f"{label}_{sfx}_round{rnd}"] = lx
                    add(f"llamacpp_{label}_pp512_tok_s_{sfx}", lx["pp512"])
                    add(f"llamacpp_{label}_tg128_tok_s_{sfx}", lx["tg128"])
                    add(f"llamacpp_{label}_pp40_ms_{sfx}", lx["pp40_ms"])
                    if isa in batched:
                        lb = llama_batched_bench(batched[isa], path, threads, a.reps)
                        details["llamacpp_batched"][f"{label}_{sfx}_round{rnd}"] = lb
                        add(f"llamacpp_{label}_batched_e2e16_tok_s_{sfx}", lb["e2e16"])
                for int8 in ([False] if a.no_int8 else [False, True]):
                    tag = f"{isa}_int8_t{threads}" if int8 else sfx
                    ours = miniinfer(isa, threads, int8, a.reps, isa in batched)
                    details.setdefault("miniinfer", {})[f"{tag}_round{rnd}"] = ours
                    add(f"miniinfer_prefill_tok_s_{tag}", ours["prefill"])
                    add(f"miniinfer_decode_tok_s_{tag}", ours["decode"])
                    add(f"miniinfer_prefill40_ms_{tag}", ours["prefill40_ms"])
                    if "e2e16" in ours:
                        add(f"miniinfer_e2e16_tok_s_{tag}", ours["e2e16"])
    details["loadavg_after"] = os.getloadavg()
    m = {k: statistics.median(v) for k, v in raw.items()}
    for threads in a.threads:
        for isa in builds:
            for tag in (f"{isa}_t{threads}", f"{isa}_int8_t{threads}"):
                if f"miniinfer_decode_tok_s_{tag}" not in m:
                    continue
                # vs llama.cpp on the same file, then on each extra type (its own best), one naming
                for ll in ["llamacpp"] + [f"llamacpp_{label}" for label in extras]:
                    m[f"decode_ratio_vs_{ll}_{tag}"] = (m[f"miniinfer_decode_tok_s_{tag}"]
                                                        / m[f"{ll}_tg128_tok_s_{isa}_t{threads}"])
                    m[f"prefill_ratio_vs_{ll}_{tag}"] = (m[f"miniinfer_prefill_tok_s_{tag}"]
                                                         / m[f"{ll}_pp512_tok_s_{isa}_t{threads}"])
                    m[f"prefill40_ratio_vs_{ll}_{tag}"] = (m[f"{ll}_pp40_ms_{isa}_t{threads}"]
                                                           / m[f"miniinfer_prefill40_ms_{tag}"])
                    if f"miniinfer_e2e16_tok_s_{tag}" in m:
                        m[f"e2e16_ratio_vs_{ll}_{tag}"] = (m[f"miniinfer_e2e16_tok_s_{tag}"]
                                                           / m[f"{ll}_batched_e2e16_tok_s_{isa}_t{threads}"])
    for k, v in m.items():
        print(f"{k:50s} {v:9.2f}")
    if a.json:
        result = {"device": device(), "date": datetime.date.today().isoformat(),
                  "command": "python benchmarks/llamacpp_cpu_bench.py " + " ".join(sys.argv[1:]),
                  "metrics": m, "details": details}
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
