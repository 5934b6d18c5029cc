"""Issue #11, kind 3: a request that fails admission leaves nothing behind, and a failure
while processing one request fails it alone."""
from __future__ import annotations

import pytest

from helpers import check_clean, random_prompts
from miniinfer import SamplingParams


def test_seed_overflow_with_n_2_is_refused_and_leaves_nothing(llama_llm):
    prompts = random_prompts(2, seed=3, min_len=4, max_len=10)
    with pytest.raises(ValueError, match="seed") as ei:
        llama_llm.generate(prompts[:1], SamplingParams(seed=2 ** 64 - 1, n=2, max_tokens=4), use_tqdm=False)
    assert getattr(ei.value, "param", None) == "seed"
    check_clean(llama_llm)
    # the next, unrelated request completes and its result is returned
    out = llama_llm.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    check_clean(llama_llm)


def test_largest_seed_with_n_2_works(llama_llm):
    prompt = random_prompts(1, seed=4, min_len=4, max_len=10)
    out = llama_llm.generate(prompt, SamplingParams(seed=2 ** 63 - 1, n=2, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]
    check_clean(llama_llm)


def test_failure_while_queuing_rolls_back(llama_llm, monkeypatch):
    eng = llama_llm.engine
    calls = []
    add = eng.scheduler.add

    def flaky(seq):
        calls.append(seq)
        if len(calls) == 2:
            raise RuntimeError("injected")
        add(seq)
    monkeypatch.setattr(eng.scheduler, "add", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        eng.add_request("r", [5, 6, 7], SamplingParams(n=3, max_tokens=2))
    assert "r" not in eng.requests and not eng.scheduler.waiting
    monkeypatch.undo()
    check_clean(llama_llm)


def test_output_failure_fails_that_request_alone(llama_llm, monkeypatch):
    """An exception while processing one request's output (a detokenizer, a stop checker, a
    grammar matcher) finishes it with finish_reason 'error' and its blocks freed; the others go on."""
    eng = llama_llm.engine
    proc = eng.output_processor
    check = proc.check_stop
    seen = {"n": 0}

    def broken(seq, token):
        if seq.request_id == "bad":
            seen["n"] += 1
            if seen["n"] == 3:
                raise ValueError("boom")
        check(seq, token)
    monkeypatch.setattr(proc, "check_stop", broken)
    prompts = random_prompts(3, seed=9, min_len=4, max_len=10)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for rid, p in zip(["a", "bad", "c"], prompts):
        eng.add_request(rid, p, params if rid != "bad" else SamplingParams(temperature=0, max_tokens=8, n=2,
                                                                           ignore_eos=True), stream=False)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    eng.on_idle()
    assert done["bad"].error and "boom" in done["bad"].error
    assert {c.finish_reason for c in done["bad"].outputs} == {"error"}
    assert [len(done[r].outputs[0].token_ids) for r in ("a", "c")] == [8, 8]
    assert done["a"].error is None
    check_clean(llama_llm)
