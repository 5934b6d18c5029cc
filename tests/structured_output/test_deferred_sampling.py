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
    assert all(c.finish_reason == "error" for c in failed[0].outputs)
    for i, o in enumerate(outs):
        if o is not failed[0]:
            assert o.outputs[0].token_ids == alone[i][0]
    check_clean(tight)
    assert sys.getswitchinterval() == pytest.approx(0.005)  # restored after every job


def test_a_rejected_last_token_still_fails_the_request(tight, monkeypatch):
    """A rejected token that is also the sequence's last (max_tokens) fails the request, as
    without deferral: the outcome is applied where the matcher would have moved, before the
    stop checks."""
    import xgrammar as xgr
    real = xgr.BatchGrammarMatcher.batch_accept_token
    victim = {}
    rejected = []

    def flaky(matchers, tokens, debug_print=False):
        ok = real(matchers, tokens, debug_print)
        seq = victim.get("seq")
        for i, m in enumerate(matchers):
            if seq is not None and m is seq.grammar and seq.num_output_tokens + 1 == seq.params.max_tokens:
                ok[i] = False  # the token that reaches max_tokens
                rejected.append(tokens[i])
        return ok
    monkeypatch.setattr(xgr.BatchGrammarMatcher, "batch_accept_token", staticmethod(flaky))
    reqs = _requests(tight)
    eng = tight.engine
    short = SamplingParams(temperature=0, max_tokens=5, structured_outputs=reqs[0][1].structured_outputs)
    eng.add_request("v", reqs[0][0], short)
    eng.add_request("w", reqs[4][0], reqs[4][1])
    victim["seq"] = eng.requests["v"].seqs[0]
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    eng.on_idle()
    assert len(rejected) == 1  # the last token went through the deferred path
    assert done["v"].outputs[0].finish_reason == "error" and "rejected token" in done["v"].error
    assert done["w"].outputs[0].finish_reason == "stop"
    check_clean(tight)


def test_a_fault_after_the_next_step_is_scheduled_rolls_it_back(tight):
    """A fault between scheduling step N+1 and queuing its forward (here: joining the grammar
    thread) rolls N+1's progress back, so the aborts of recovery publish no page that was
    never written: the same prompt later gives what a cache-less engine gives."""
    eng = tight.engine
    story = eng.apply_chat_template([{"role": "user", "content": "Summarize: " + " ".join(
        f"The river number {i} flows north past the old mill and the stone bridge." for i in range(3))}])
    reference = LLM(None, dtype="float32", max_model_len=1024, progress=False, num_kv_blocks=16,
                    enable_prefix_caching=False).generate(story, SamplingParams(temperature=0, max_tokens=12),
                                                          use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("a", _requests(tight)[0][0], _requests(tight)[0][1])
    for _ in range(4):
        eng.step()
    assert eng._pending is not None
    eng.add_request("x", story, SamplingParams(temperature=0, max_tokens=12))
    seq = eng.requests["x"].seqs[0]
    so = eng._structured
    real = so.finish_step

    def boom(job):
        real(job)
        raise RuntimeError("injected fault")
    so.finish_step = boom
    try:
        with pytest.raises(RuntimeError, match="injected"):
            eng.step()
    finally:
        del so.finish_step
    assert seq.num_computed_tokens == seq.num_cached_tokens < 48  # its first chunk scheduled, then rolled back
    for rid in list(eng.requests):  # what recovery does
        eng.abort_request(rid)
    eng.on_idle()
    check_clean(tight)
    out = tight.generate(story, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference
    check_clean(tight)
