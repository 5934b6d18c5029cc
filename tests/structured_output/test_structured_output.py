"""Structured output (issue #12, first part) on the embedded SmolLM2, real text: JSON schemas,
any-JSON, regex, EBNF and choice constraints hold, greedy and sampled; bad constraints are a
ValueError naming the problem; a constrained request in a batch gets what it gets alone."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from helpers import check_clean
from miniinfer import LLM, SamplingParams, StructuredOutputsParams
from miniinfer.engine import deferred_sampling
from schemas import SCHEMAS

QUESTION = "Answer with JSON describing a made-up example that fits this JSON schema: {}"


def _prompt(llm, schema) -> str:
    return llm.engine.apply_chat_template([{"role": "user", "content": QUESTION.format(json.dumps(schema))}])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schemas_parse_and_validate(smol, temperature):
    prompts = [_prompt(smol, s) for s in SCHEMAS]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=160,
                             structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(SCHEMAS)]
    outs = smol.generate(prompts, params, use_tqdm=False)
    assert len(SCHEMAS) >= 30
    for schema, out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
    check_clean(smol)


def test_json_object_regex_grammar_choice(smol):
    q = smol.engine.apply_chat_template([{"role": "user", "content": "Tell me about Paris."}])
    cases = [
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), (dict, list))),
        (StructuredOutputsParams(regex=r"[A-Z][a-z]+ is [0-9]{1,3} km away\."),
         lambda t: re.fullmatch(r"[A-Z][a-z]+ is [0-9]{1,3} km away\.", t)),
        (StructuredOutputsParams(grammar='root ::= "The answer is " ("yes" | "no") "."'),
         lambda t: t in ("The answer is yes.", "The answer is no.")),
        (StructuredOutputsParams(choice=["Paris", "London", "Rome"]), lambda t: t in ("Paris", "London", "Rome")),
    ]
    for temperature in (0.0, 1.0):
        outs = smol.generate([q] * len(cases), [SamplingParams(temperature=temperature, seed=3, max_tokens=200,
                                                               structured_outputs=so) for so, _ in cases],
                             use_tqdm=False)
        for (so, ok), out in zip(cases, outs):
            c = out.outputs[0]
            assert c.finish_reason == "stop" and ok(c.text), (so, c.text, c.finish_reason)
    check_clean(smol)


@pytest.mark.parametrize("so,match", [
    (StructuredOutputsParams(json={"type": "objectx"}), "json"),
    (StructuredOutputsParams(json="{not json"), "json"),
    (StructuredOutputsParams(regex="([a-"), "regex"),
    (StructuredOutputsParams(grammar="root ::= ("), "grammar"),
    (StructuredOutputsParams(json={"type": "object"}, regex="a"), "exactly one"),
    (StructuredOutputsParams(choice=[]), "exactly one"),
])
def test_invalid_constraints_are_value_errors(smol, so, match):
    with pytest.raises(ValueError, match=match) as ei:
        smol.generate("hi", SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    assert getattr(ei.value, "param", None) == "structured_outputs"
    check_clean(smol)


def test_adversarial_schema_is_bounded(smol):
    """Deeply nested oneOf schemas: refused or compiled within the time limit, never a crash
    or a runaway; the engine goes on."""
    doubling: dict = {"type": "integer"}  # one dict reused twice per level: 2^60 values as a tree
    linear: dict = {"type": "integer"}  # text linear in depth
    for _ in range(60):
        doubling = {"oneOf": [doubling, {"type": "array", "items": doubling}]}
        linear = {"oneOf": [{"type": "integer"}, {"type": "array", "items": linear}]}
    for schema in (doubling, linear, json.dumps(linear)):
        t = time.monotonic()
        with pytest.raises(ValueError, match="limit") as ei:
            smol.generate("hi", SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json=schema)),
                          use_tqdm=False)
        assert getattr(ei.value, "param", None) == "structured_outputs"
        assert time.monotonic() - t < 5
    big = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(ValueError, match="limit"):
        smol.generate("hi", SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json=big)),
                      use_tqdm=False)
    out = smol.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    check_clean(smol)


@pytest.mark.parametrize("overlap", [True, False])
def test_mixed_batch_gives_each_what_it_gets_alone(overlap):
    """Constrained and plain requests together, under chunked prefill (a small token budget)
    and preemption (a small KV cache): each greedy output equals the request run alone."""
    llm = LLM(None, dtype="float32", max_model_len=1024, progress=False, overlap_scheduling=overlap,
              max_num_batched_tokens=64, num_kv_blocks=16)
    schemas = SCHEMAS[:4]
    reqs = []
    for i in range(8):
        so = StructuredOutputsParams(json=schemas[i % 4]) if i % 2 == 0 else None
        content = QUESTION.format(json.dumps(schemas[i % 4])) if so else f"Count from {i} to {i + 9}."
        prompt = llm.engine.apply_chat_template([{"role": "user", "content": content}])
        reqs.append((prompt, SamplingParams(temperature=0, max_tokens=80, structured_outputs=so)))
    alone = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in reqs]
    together = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert llm.engine.scheduler.num_preemptions > 0
    for (p, sp), o in zip(reqs, together):
        if sp.structured_outputs is not None:
            jsonschema.validate(json.loads(o.outputs[0].text), sp.structured_outputs.json)
    check_clean(llm)


def test_n_choices_each_have_a_matcher(smol):
    schema = SCHEMAS[0]
    out = smol.generate(_prompt(smol, schema), SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=100,
                                                              structured_outputs=StructuredOutputsParams(json=schema)),
                        use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), schema)
    check_clean(smol)


@pytest.mark.parametrize("deferred", [True, False])
def test_overlap_samples_after_the_previous_step_is_processed(smol, deferred):
    """With overlap scheduling a constrained step samples only after the previous step is
    processed (its tokens advance the matchers). Deferred sampling: process N-1, stage N+1's
    inputs, sample N, run N+1 (the mask filled on the grammar thread meanwhile); without it:
    forward N, process N-1, sample N (the mask filled while the forward runs)."""
    eng = smol.engine
    events = []
    names = {"prepare_forward": "P", "run_forward": "R", "sample": "S"}
    saved = {n: getattr(eng.runner, n) for n in names}
    for n, c in names.items():
        setattr(eng.runner, n, lambda *a, _f=saved[n], _c=c, **k: (events.append(_c), _f(*a, **k))[1])
    proc = eng._process
    eng._process = lambda *a: (events.append("X"), proc(*a))[1]
    eng.deferred_sampling, eng.defer_min_rows = deferred, 1
    try:
        out = smol.generate(_prompt(smol, SCHEMAS[2]), SamplingParams(
            temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(json=SCHEMAS[2])),
            use_tqdm=False)[0].outputs[0]
    finally:
        eng.deferred_sampling, eng.defer_min_rows = True, deferred_sampling.DEFER_MIN_ROWS
        for n in names:
            delattr(eng.runner, n)
        del eng._process
    jsonschema.validate(json.loads(out.text), SCHEMAS[2])
    assert eng.config.overlap_scheduling
    order = "".join(events)
    assert order.count("XPSR" if deferred else "PRXS") >= 3, order
    assert ("PRXS" in order) == (not deferred), order
    check_clean(smol)


def test_min_tokens_with_a_grammar_is_refused(smol):
    """The grammar decides where the output ends: a min_tokens ban on EOS could leave no token."""
    with pytest.raises(ValueError, match="min_tokens") as ei:
        smol.generate("hi", SamplingParams(min_tokens=5, max_tokens=8, structured_outputs=StructuredOutputsParams(
            choice=["yes", "no"])), use_tqdm=False)
    assert ei.value.param == "min_tokens"
    check_clean(smol)


def test_fill_pool_writes_what_one_by_one_fills_write(smol):
    """The threaded fill (persistent threads, chunks of interleaved rows) writes exactly the
    rows the one-by-one fill writes, and no other row, for matchers in different states."""
    import torch
    import xgrammar as xgr
    from miniinfer.structured_output.fill_pool import FillPool as _FillPool
    so = smol.engine.structured_output
    grammar = so.compile(StructuredOutputsParams(json=SCHEMAS[0]))
    width = xgr.get_bitmask_shape(1, so.info.vocab_size)[1]
    one = torch.empty((1, width), dtype=torch.int32)
    stop = set(so.info.stop_token_ids)
    matchers = []
    for i in range(23):  # matcher i has accepted i % 7 tokens: the (i // 7)-th allowed one each time
        m = so.new_matcher(grammar)
        for _ in range(i % 7):
            m.fill_next_token_bitmask(one, 0)
            allowed = [w * 32 + b for w, x in enumerate(one[0].tolist()) if x for b in range(32)
                       if (x >> b) & 1 and w * 32 + b not in stop]
            assert m.accept_token(allowed[min(i // 7, len(allowed) - 1)])
        matchers.append(m)
    rows = [3 * i + 1 for i in range(len(matchers))]  # not contiguous: row 0, 2, 3, ... stay untouched
    want = torch.full((3 * len(matchers) + 2, width), 7, dtype=torch.int32)
    for m, r in zip(matchers, rows):
        m.fill_next_token_bitmask(want, r)
    for threads in (2, 3, 8):
        got = torch.full_like(want, 7)
        _FillPool(threads).fill(matchers, got, rows)
        assert torch.equal(got, want), threads


def test_fill_pool_tasks_run_in_the_callers_inference_mode():
    """Inference mode is per thread: a task on a pool thread may update in place a tensor made
    under the caller's inference mode (a verify mask's rows; failed on 16 GPU-host cores)."""
    import torch
    from miniinfer.structured_output.fill_pool import FillPool
    pool = FillPool(3)
    with torch.inference_mode():
        t = torch.zeros(8, 4, dtype=torch.int32)

        def task(i):
            t[i][(t[i] == 0)] = i + 1
        import functools
        pool.run([functools.partial(task, i) for i in range(8)])
    assert t[:, 0].tolist() == list(range(1, 9))
