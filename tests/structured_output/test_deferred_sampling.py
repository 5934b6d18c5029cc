"""Deferred sampling (structured output with overlap scheduling): a constrained step samples
after the next step is scheduled and staged, its matchers advanced and its mask filled on the
grammar thread meanwhile. Same tokens as without it, under chunked prefill, preemption,
``n > 1``, aborts and a grammar that rejects a token."""
from __future__ import annotations

import json
import sys

import jsonschema
import pytest

from helpers import check_clean
from miniinfer import LLM, SamplingParams, StructuredOutputsParams
from schemas import SCHEMAS


@pytest.fixture(scope="module")
def tight():
    """Chunked prefill (a small token budget) and preemption (a small KV cache)."""
    llm = LLM(None, dtype="float32", max_model_len=1024, progress=False, max_num_batched_tokens=64,
              num_kv_blocks=16)
    llm.engine.defer_min_rows = 1  # every constrained step (the default waits for 8 rows)
    return llm


def _requests(llm) -> list[tuple[str, SamplingParams]]:
    def chat(text: str) -> str:
        return llm.engine.apply_chat_template([{"role": "user", "content": text}])
    cases = [
        (chat("Describe a person as JSON: " + json.dumps(SCHEMAS[0])), StructuredOutputsParams(json=SCHEMAS[0])),
        (chat("Count from 3 to 12."), None),
        (chat("Where is Rome?"), StructuredOutputsParams(regex=r"Rome is in [A-Z][a-z]+\.")),
        (chat("Pick a city."), StructuredOutputsParams(choice=["Paris", "London", "Rome"])),
        (chat("Describe a product as JSON: " + json.dumps(SCHEMAS[3])), StructuredOutputsParams(json=SCHEMAS[3])),
        (chat("Write a haiku about rain."), None),
    ]
    out = [(p, SamplingParams(temperature=0, max_tokens=60, structured_outputs=so)) for p, so in cases]
    out.append((cases[0][0], SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=60,
                                            structured_outputs=cases[0][1])))
    return out


def _run(llm, reqs, deferred: bool):
    eng = llm.engine
    calls = 0
    step = eng._step_deferred

    def counted():
        nonlocal calls
        calls += 1
        return step()
    eng._step_deferred, eng.deferred_sampling = counted, deferred
    try:
        outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    finally:
        eng.deferred_sampling = True
        del eng._step_deferred
    return [[c.token_ids for c in o.outputs] for o in outs], outs, calls


def test_same_tokens_with_and_without_deferral(tight):
    reqs = _requests(tight)
    preempted = tight.engine.scheduler.num_preemptions
    deferred, outs, calls = _run(tight, reqs, True)
    assert calls > 20  # most constrained steps went through the deferred path
    assert tight.engine.scheduler.num_preemptions > preempted
    check_clean(tight)
    plain, _, plain_calls = _run(tight, reqs, False)
    assert plain_calls == 0
    assert deferred == plain
    check_clean(tight)
    for (_, sp), o in zip(reqs, outs):
        so = sp.structured_outputs
        for c in o.outputs if so is not None else []:
            assert c.finish_reason == "stop", (so, c.text)
            if so.json is not None:
                jsonschema.validate(json.loads(c.text), so.json)
            if so.choice is not None:
                assert c.text in so.choice


def test_abort_while_a_forward_awaits_its_sample(tight):
    """Aborting a constrained request between steps (its next forward queued, unsampled)
    leaves the others' tokens as they are alone and frees everything."""
    reqs = _requests(tight)[:4]
    alone, _, _ = _run(tight, reqs, True)
    eng = tight.engine
    for i, (p, sp) in enumerate(reqs):
        eng.add_request(f"r{i}", p, sp)
    done: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 12:
            assert eng._pending is not None  # a constrained forward awaits its sample
            eng.abort_request("r0")
    eng.on_idle()
    assert "r0" not in done or len(done["r0"]) < len(alone[0][0])
    for i in (1, 2, 3):
        assert done[f"r{i}"] == alone[i][0]
    check_clean(tight)


def test_a_rejected_token_fails_only_its_request(tight, monkeypatch):
    """If the grammar thread's matcher rejects a committed token (the mask should make that
    impossible), that request ends with an error and the others go on unchanged."""
    import xgrammar as xgr
    reqs = _requests(tight)[:3]
    alone, _, _ = _run(tight, reqs, True)
    real = xgr.BatchGrammarMatcher.batch_accept_token
    victim = {}
    calls = 0

    def flaky(matchers, tokens, debug_print=False):
        nonlocal calls
        calls += 1
        ok = real(matchers, tokens, debug_print)
        if calls == 8:  # the first sequence (the JSON request) is the victim
            victim["matcher"] = matchers[0]
            ok[0] = False
        return ok
    monkeypatch.setattr(xgr.BatchGrammarMatcher, "batch_accept_token", staticmethod(flaky))
    outs = tight.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert victim
    failed = [o for o in outs if o.outputs[0].finish_reason == "error"]
    assert len(failed) == 1 and "rejected token" in failed[0].error
    for i, o in enumerate(outs):
        if o is not failed[0]:
            assert o.outputs[0].token_ids == alone[i][0]
    check_clean(tight)
    assert sys.getswitchinterval() == pytest.approx(0.005)  # restored after every job
