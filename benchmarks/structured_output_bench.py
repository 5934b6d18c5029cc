"""§10 structured output (shared/BENCHMARKS.md): JSON-schema-constrained vs unconstrained
decoding on the same prompts, grammar-mask overlap on and off, mask fill time, compile latency.

GPU (Qwen2 configs with dummy bf16 weights and a Qwen2 tokenizer, both models in one process:
~90-115 s on an H200, engine starts included). The tokenizer: **Qwen2's real vocabulary**, built
from llama.cpp's vocab-only ``ggml-vocab-qwen2.gguf`` by ``benchmarks/qwen2_vocab_tokenizer.py``
(transformers' GGUF conversion; the GGUF is read out of the ``llama_cpp_python==0.3.36`` PyPI
sdist, downloaded when ``--gguf`` is not given; 151,643 BPE tokens + the 3 specials, eos
``<|endoftext|>`` 151643; a 5.4 MB folder, checked against llama.cpp's own tokenization tests)::

    python benchmarks/qwen2_vocab_tokenizer.py .vllm/bench_tokenizer_qwen2

Prefer it to the stand-in of ``benchmarks/make_bench_tokenizer.py`` (a BPE trained on local text
with Qwen2's size and id layout, ``.vllm/bench_tokenizer``), kept as the fallback when neither
the sdist nor the GGUF can be had: xgrammar's per-row mask fill on ``SCHEMA`` costs ~6x more
with the stand-in (2-core CPU, one valid 190-token JSON walked row by row: mean ~88 vs ~15 µs),
so results measured with it overstate the grammar overhead; record which tokenizer a result
used (the result's ``details.tokenizer`` copies its ``bench_tokenizer_stats.json``).
The device image has no xgrammar: carry its wheels (cp312: xgrammar 0.2.9,
apache-tvm-ffi, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions)
in ``.whl`` and install them with ``pip install --no-index --no-deps --target /tmp/site``
first (``PYTHONPATH=/tmp/site``); carry ``.vllm`` (the tokenizer folder and ``.vllm/configs``;
the folder needs only transformers + tokenizers there, not gguf)::

    python3 benchmarks/structured_output_bench.py \\
        --model-dir .vllm/configs/Qwen2-0.5B .vllm/configs/Qwen2-7B \\
        --tokenizer .vllm/bench_tokenizer_qwen2 --batch-sizes 1 64 --max-tokens 256 \\
        --out benchmarks/results/<date>-structured-output-h200.json

CPU smoke run (tiny shape of the 0.5B config, a few tokens; exercises every code path)::

    python benchmarks/structured_output_bench.py --quick --device cpu \\
        --model-dir .vllm/configs/Qwen2-0.5B --tokenizer .vllm/bench_tokenizer_qwen2

Workload, per model and batch size B (1 and 64):
* B prompts of 128 random token ids in [0, 10000) (``random.Random(B)``), the same prompts in
  every mode; greedy; ``max_tokens=256``.
* ``plain``: unconstrained, ``ignore_eos=True`` (dummy weights: runs the full 256 tokens).
* ``json``: constrained by ``SCHEMA`` (below), grammar-mask overlap on (the default: the host fills
  the bitmask while the forward runs).
* ``json_undeferred``: the same with deferred sampling off (``engine.deferred_sampling =
  False``): the mask of step N is filled inside ``sample`` on the engine thread after step N-1
  is processed, instead of on the grammar thread while N-1 is processed and N+1 is scheduled
  and staged; ``*_deferred_sampling_tpot_cut`` = 1 − json / json_undeferred TPOT.
* ``json_serial``: the same with the overlap off (deferred sampling off too) — ``engine.structured_output.overlap = False``
  on the same engine, which is exactly what ``EngineConfig.structured_output_overlap=False``
  sets (``StructuredOutputManager.fill_bitmask`` then synchronizes with the device before
  filling). One engine per model serves all four modes.
* The modes alternate (plain, json, json_undeferred, json_serial) within each of ``--repeats`` rounds after one
  untimed warm-up round; each metric is the median over the rounds.

TPOT of one request = (finished_time - first_token_time) / (output tokens - 1) from the
request's own timestamps (so the prefill and a constrained request that ends early both count
correctly); a round's TPOT is the mean over its B requests. A constrained request may end
before ``max_tokens`` when its JSON closes, and at B = 64 the batch then shrinks: the schema is
built so that this is rare (below) and ``*_mean_output_tokens`` / ``*_finished_by_length_frac``
report what happened.

The schema (``SCHEMA``; ``--schema-file`` replaces it): a flat object, 8 fields, all required,
``additionalProperties: false`` — four strings (``name`` 8–64 and ``city`` 4–64 characters,
``description`` and ``notes`` 128–512), two bounded integers, an enum of four values and an
array of 8–64 integers in [0, 100]. Why the bounds: with dummy weights the tokens picked are
arbitrary, and without bounds a generation tends to stay in its first string (or integer) for
all 256 tokens, which measures one grammar state only; with these bounds it walks through every
field and generations stay long (first H200 run: mean constrained lengths 193–236 of 256
tokens; unbounded strings: 81–256, one request stuck in one string). The bounds have a cost
(xgrammar 0.2.9): per-row fills inside a bounded string take ~1.7x those of an unbounded one,
and cold compiles ~31-38 ms instead of ~6 ms; ``--schema-variant unbounded-strings`` drops the
string bounds for comparison (first H200 run, bs 64: fill p50 ~6-7 ms vs ~10 ms per step).

Other metrics: ``grammar_mask_fill_us_p50/p99`` — host microseconds per step's bitmask fill
(``StructuredOutputManager.fill_times_us``) pooled over the timed ``json`` rounds (and
``*_serial`` for the serial rounds); ``grammar_compile_ms_cold`` — wall time of
``engine.compile_grammar(params)`` for a schema never compiled before (the §10 schema with
salted field names, so neither our cache nor xgrammar's has it; median of 3 salts) and
``grammar_compile_ms_warm`` — the same call again (cache hit). ``grammar_first_request_ms_cold
/warm`` time a whole one-token, batch-1 request (prefill + compile + one constrained step) with a
fresh / the same salted schema, next to ``plain_first_request_ms``; ``grammar_manager_init_ms`` is
the one-off build of the xgrammar tokenizer info on the engine's first constrained request.

``*_valid_json_frac_of_stopped``: the share of constrained outputs that completed their grammar
and parse with ``json.loads``; ``*_lenient_*`` allows raw control characters in strings, which
xgrammar 0.2.9 lets through in strings with ``minLength``/``maxLength`` (its bug; a few of them in
the details' ``invalid_json_examples``). Note also that the engine compiles the schema with its
keys sorted, so outputs list the properties alphabetically, not in the schema's order.

Metric names carry the model (config folder name, lower case, ``-``/``.`` → ``_``) and batch
size, e.g. ``qwen2_0_5b_bs64_json_tpot_overhead`` (= json / plain TPOT).
"""
from __future__ import annotations

import argparse
import importlib.util
import copy
import datetime
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch

if importlib.util.find_spec("miniinfer") is None:  # the repo's miniinfer, unless one is on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (PYTHONPATH=<old copy>: A/B)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_phases import StepPhases  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 8, "maxLength": 64},
        "description": {"type": "string", "minLength": 128, "maxLength": 512},
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "quantity": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "status": {"type": "string", "enum": ["active", "inactive", "pending", "archived"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 8, "maxItems": 64},
        "city": {"type": "string", "minLength": 4, "maxLength": 64},
        "notes": {"type": "string", "minLength": 128, "maxLength": 512},
    },
    "required": ["name", "description", "id", "quantity", "status", "scores", "city", "notes"],
    "additionalProperties": False,
}

# a tiny model of the same vocabulary for --quick (CPU smoke runs)
QUICK_OVERRIDES = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
PROMPT_LEN = 128
INVALID_EXAMPLES: list[dict] = []  # constrained outputs that ended but don't parse: into "details"
PHASES: dict[str, dict] = {}  # host µs per step by phase (benchmarks/step_phases.py): into "details"


def salted_schema(salt: str) -> dict:
    """The §10 schema with every field name salted: a grammar no cache has seen."""
    s = copy.deepcopy(SCHEMA)
    if isinstance(s.get("properties"), dict):
        s["properties"] = {f"{k}_{salt}": v for k, v in s["properties"].items()}
        s["required"] = [f"{k}_{salt}" for k in s.get("required", [])]
    else:  # a --schema-file without properties: a new title at least makes a new cache key
        s["title"] = salt
    return s


def model_tag(model_dir: str) -> str:
    name = os.path.basename(os.path.normpath(model_dir)).lower()
    return "".join(c if c.isalnum() else "_" for c in name)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from miniinfer.bench.common import device_name as cpu_name
    return cpu_name()


def prepare_model_dir(model_dir: str, overrides: dict, tmp: str) -> str:
    """``model_dir`` itself, or a copy of its config.json with ``overrides`` applied."""
    if not overrides:
        return model_dir
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(overrides)
    out = os.path.join(tmp, os.path.basename(os.path.normpath(model_dir)))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def prompt_vocab(llm) -> int:
    """Prompt token ids are drawn from [0, this): 10000 as in §1-§3, less for a tiny vocabulary."""
    return min(10000, llm.engine.model_config.vocab_size, len(llm.get_tokenizer()))


def run_round(llm, prompts, params) -> dict:
    """One generate call over the batch: mean per-request TPOT and output lengths."""
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t
    tpots, lens, by_length, valid, lenient, stopped, invalid = [], [], 0, 0, 0, 0, []
    for r in outs:
        c = r.outputs[0]
        n = len(c.token_ids)
        lens.append(n)
        if n >= 2 and r.metrics.get("finished_time") is not None:
            tpots.append((r.metrics["finished_time"] - r.metrics["first_token_time"]) / (n - 1))
        by_length += c.finish_reason == "length"
        if c.finish_reason == "stop":  # the grammar completed: the text should be JSON
            stopped += 1
            try:
                json.loads(c.text)
                valid += 1
                lenient += 1
            except ValueError as e:
                try:
                    json.loads(c.text, strict=False)  # raw control characters inside strings allowed
                    lenient += 1
                except ValueError:
                    pass
                pos = getattr(e, "pos", 0) or 0
                invalid.append({"error": str(e), "around": c.text[max(0, pos - 40):pos + 40]})
    return {"tpot_ms": statistics.mean(tpots) * 1e3 if tpots else float("nan"), "wall_s": wall,
            "mean_output_tokens": statistics.mean(lens), "finished_by_length_frac": by_length / len(outs),
            "stopped": stopped, "valid_json": valid, "valid_json_lenient": lenient, "invalid": invalid,
            "sample": outs[0].outputs[0].text, "token_ids": [list(r.outputs[0].token_ids) for r in outs]}


def bench_batch(llm, bs: int, max_tokens: int, repeats: int, tag: str, progress) -> dict:
    from miniinfer import SamplingParams
    from miniinfer.sampling_params import StructuredOutputsParams
    rng = random.Random(bs)
    prompts = [[rng.randrange(prompt_vocab(llm)) for _ in range(PROMPT_LEN)] for _ in range(bs)]
    plain = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    so = llm.engine.structured_output
    # (mode, params, mask overlap, deferred sampling)
    modes = [("plain", plain, True, True), ("json", constrained, True, True),
             ("json_undeferred", constrained, True, False), ("json_serial", constrained, False, False)]
    rounds: dict[str, list[dict]] = {m[0]: [] for m in modes}
    timer = StepPhases(llm.engine)  # host µs per step by phase, the last timed round of each mode
    fills: dict[str, list[float]] = {"json": [], "json_undeferred": [], "json_serial": []}
    deferred = llm.engine.deferred_sampling
    for rep in range(repeats + 1):  # round 0: warm-up, untimed
        for mode, params, overlap, defer in modes:
            so.overlap = overlap
            llm.engine.deferred_sampling = deferred and defer
            so.fill_times_us.clear()
            timer.reset()
            res = run_round(llm, prompts, params)
            res["phases_us"] = timer.summary()
            if rep:
                rounds[mode].append(res)
                if mode in fills:
                    fills[mode].extend(so.fill_times_us)
            progress(f"{tag} bs{bs} round {rep}{' (warm-up)' if not rep else ''} {mode}: "
                     f"TPOT {res['tpot_ms']:.3f} ms, mean output {res['mean_output_tokens']:.1f} tokens, "
                     f"{res['stopped']} stopped ({res['valid_json']} valid JSON, "
                     f"{res['valid_json_lenient']} with control characters allowed)")
            if not rep and mode == "json":
                progress(f"{tag} bs{bs} sample json output: {res['sample'][:300]!r}")
    timer.remove()
    so.overlap = llm.engine.config.structured_output_overlap
    llm.engine.deferred_sampling = deferred
    p = f"{tag}_bs{bs}_"
    PHASES[f"{p[:-1]}"] = {mode[0]: rounds[mode[0]][-1]["phases_us"] for mode in modes}
    m = {}
    for mode, *_ in modes:
        rs = rounds[mode]
        m[f"{p}{mode}_tpot_ms"] = statistics.median(r["tpot_ms"] for r in rs)
        m[f"{p}{mode}_mean_output_tokens"] = statistics.mean(r["mean_output_tokens"] for r in rs)
        m[f"{p}{mode}_finished_by_length_frac"] = statistics.mean(r["finished_by_length_frac"] for r in rs)
        m[f"{p}{mode}_wall_s"] = statistics.median(r["wall_s"] for r in rs)
        if mode != "plain":
            stopped = sum(r["stopped"] for r in rs)
            m[f"{p}{mode}_valid_json_frac_of_stopped"] = (sum(r["valid_json"] for r in rs) / stopped
                                                         if stopped else 1.0)
            m[f"{p}{mode}_valid_json_lenient_frac_of_stopped"] = (
                sum(r["valid_json_lenient"] for r in rs) / stopped if stopped else 1.0)
            INVALID_EXAMPLES.extend({"where": f"{p}{mode}", **x} for r in rs for x in r["invalid"][:2])
    m[p + "json_tpot_overhead"] = m[p + "json_tpot_ms"] / m[p + "plain_tpot_ms"]
    m[p + "json_tpot_overhead_serial"] = m[p + "json_serial_tpot_ms"] / m[p + "plain_tpot_ms"]
    m[p + "json_tpot_ms_serial"] = m.pop(p + "json_serial_tpot_ms")
    m[p + "grammar_overlap_tpot_cut"] = 1 - m[p + "json_tpot_ms"] / m[p + "json_tpot_ms_serial"]
    m[p + "json_tpot_overhead_undeferred"] = m[p + "json_undeferred_tpot_ms"] / m[p + "plain_tpot_ms"]
    m[p + "deferred_sampling_tpot_cut"] = 1 - m[p + "json_tpot_ms"] / m[p + "json_undeferred_tpot_ms"]
    m[p + "grammar_mask_fill_us_p50_undeferred"] = percentile(fills["json_undeferred"], 50)
    # greedy: deferring the sample must not change a token (same batches, same masks)
    same = [a == b for r, u in zip(rounds["json"], rounds["json_undeferred"])
            for a, b in zip(r["token_ids"], u["token_ids"])]
    m[p + "json_deferred_same_tokens_frac"] = sum(same) / len(same)
    m[p + "grammar_mask_fill_us_p50"] = percentile(fills["json"], 50)
    m[p + "grammar_mask_fill_us_p99"] = percentile(fills["json"], 99)
    m[p + "grammar_mask_fill_us_p50_serial"] = percentile(fills["json_serial"], 50)
    m[p + "grammar_mask_fill_us_p99_serial"] = percentile(fills["json_serial"], 99)
    m[p + "grammar_mask_fills"] = len(fills["json"])
    return m


def bench_compile(llm, tag: str, salts: int = 3) -> dict:
    """Cold / warm compile of a fresh schema, and cold / warm first request (max_tokens=1)."""
    from miniinfer import SamplingParams
    from miniinfer.sampling_params import StructuredOutputsParams
    nonce = f"{os.getpid()}{time.time_ns() % 10**6}"
    rng = random.Random(7)
    prompt = [[rng.randrange(prompt_vocab(llm)) for _ in range(PROMPT_LEN)]]

    def params(salt: str, max_tokens: int = 1):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens,
                              structured_outputs=StructuredOutputsParams(json=salted_schema(salt)))

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t) * 1e3

    cold, warm, first_cold, first_warm, first_plain = [], [], [], [], []
    for i in range(salts):
        p = params(f"c{nonce}_{i}")
        cold.append(timed(lambda: llm.engine.compile_grammar(p)))
        warm.append(timed(lambda: llm.engine.compile_grammar(p)))
        q = params(f"r{nonce}_{i}")
        first_cold.append(timed(lambda: llm.generate(prompt, q, use_tqdm=False)))
        first_warm.append(timed(lambda: llm.generate(prompt, q, use_tqdm=False)))
        plain = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        first_plain.append(timed(lambda: llm.generate(prompt, plain, use_tqdm=False)))
    med = statistics.median
    return {f"{tag}_grammar_compile_ms_cold": med(cold), f"{tag}_grammar_compile_ms_warm": med(warm),
            f"{tag}_grammar_first_request_ms_cold": med(first_cold),
            f"{tag}_grammar_first_request_ms_warm": med(first_warm),
            f"{tag}_plain_first_request_ms": med(first_plain)}


def bench_model(model_dir: str, args, overrides: dict, tmp: str, progress) -> dict:
    from miniinfer import LLM, SamplingParams
    from miniinfer.sampling_params import StructuredOutputsParams
    tag = model_tag(model_dir)
    folder = prepare_model_dir(model_dir, overrides, tmp)
    max_len = PROMPT_LEN + args.max_tokens + 64
    max_seqs = max(args.batch_sizes)
    # a KV cache just big enough (+25 %): fast start, and the next model finds the memory free
    blocks = (max_seqs * -(-max_len // 16)) * 5 // 4 + 16
    kw = dict(load_format="dummy", tokenizer=args.tokenizer, device=args.device, seed=0, progress=False,
              max_model_len=max_len, max_num_seqs=max_seqs, block_size=16, num_kv_blocks=blocks,
              dtype="bfloat16" if args.device == "cuda" else "float32")
    t = time.perf_counter()
    llm = LLM(folder, **kw)
    m = {f"{tag}_engine_start_s": time.perf_counter() - t}
    progress(f"{tag}: engine up in {m[f'{tag}_engine_start_s']:.1f} s")
    # the one-off xgrammar tokenizer info + the first compile of the §10 schema, untimed by the rest
    t = time.perf_counter()
    _ = llm.engine.structured_output
    m[f"{tag}_grammar_manager_init_ms"] = (time.perf_counter() - t) * 1e3
    llm.engine.compile_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    llm.generate([[1] * PROMPT_LEN], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # warm-up request
    m.update(bench_compile(llm, tag))
    progress(f"{tag}: compile cold {m[f'{tag}_grammar_compile_ms_cold']:.1f} ms, "
             f"warm {m[f'{tag}_grammar_compile_ms_warm']:.3f} ms")
    for bs in args.batch_sizes:
        m.update(bench_batch(llm, bs, args.max_tokens, args.repeats, tag, progress))
    llm.engine.check_integrity()
    llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return m


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k] = json.loads(v)
    return out


def main(argv: list[str] | None = None) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description="§10 structured-output benchmark (see the module docstring)")
    ap.add_argument("--model-dir", nargs="+", default=[os.path.join(here, ".vllm", "configs", "Qwen2-0.5B"),
                                                       os.path.join(here, ".vllm", "configs", "Qwen2-7B")],
                    help="config folders (config.json; dummy weights), benchmarked one after the other")
    ap.add_argument("--tokenizer", default=os.path.join(here, ".vllm", "bench_tokenizer"),
                    help="tokenizer folder (benchmarks/make_bench_tokenizer.py)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 64 (--quick: 1 4)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 256 (--quick: 24)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per mode; default 3 (--quick: 1)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--override", nargs="*", default=None, metavar="KEY=JSON",
                    help="config.json overrides, e.g. num_hidden_layers=2 (--quick: a tiny shape, same vocab)")
    ap.add_argument("--schema-file", default=None, help="a JSON schema file replacing the built-in SCHEMA")
    ap.add_argument("--schema-variant", choices=["bounded", "unbounded-strings"], default="bounded",
                    help="unbounded-strings: the schema's strings without minLength/maxLength (for comparison)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model shape, few tokens, one round")
    ap.add_argument("--out", default=None, help="result JSON (benchmarks/results/<date>-<name>.json)")
    args = ap.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 64])
    args.max_tokens = args.max_tokens or (24 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 3)
    overrides = parse_overrides(args.override) if args.override is not None else (
        dict(QUICK_OVERRIDES) if args.quick else {})
    global SCHEMA
    if args.schema_file:
        with open(args.schema_file) as f:
            SCHEMA = json.load(f)
    if args.schema_variant == "unbounded-strings":
        SCHEMA = copy.deepcopy(SCHEMA)
        for spec in SCHEMA.get("properties", {}).values():
            if spec.get("type") == "string" and "enum" not in spec:
                spec.pop("minLength", None)
                spec.pop("maxLength", None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here (use --device cpu)")
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        raise SystemExit(f"no tokenizer.json in {args.tokenizer}: run benchmarks/make_bench_tokenizer.py first")

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    metrics: dict = {"prompt_len": PROMPT_LEN, "max_tokens": args.max_tokens, "repeats": args.repeats}
    tmp = tempfile.mkdtemp(prefix="so_bench_")
    try:
        for model_dir in args.model_dir:
            metrics.update(bench_model(model_dir, args, overrides, tmp, progress))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metrics["total_wall_s"] = time.perf_counter() - t0
    argv_str = " ".join(sys.argv[1:] if argv is None else argv)
    result = {"device": device_name(args.device), "date": datetime.date.today().isoformat(),
              "command": f"python benchmarks/structured_output_bench.py {argv_str}".strip(),
              "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
              "details": {"schema": SCHEMA, "tokenizer": _tokenizer_stats(args.tokenizer),
                          "model_dirs": args.model_dir, "config_overrides": overrides,
                          "batch_sizes": args.batch_sizes, "schema_variant": args.schema_variant,
                          "invalid_json_examples": INVALID_EXAMPLES[:12],
                          "host_phases_us_per_step": PHASES}}
    print(json.dumps(result["metrics"], indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _tokenizer_stats(folder: str) -> dict | str:
    path = os.path.join(folder, "bench_tokenizer_stats.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return folder


if __name__ == "__main__":
    main()
