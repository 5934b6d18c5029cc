"""The engine's own API (what the server drives): add_request / step / abort, streaming
outputs, length limits."""
from __future__ import annotations

import pytest

from helpers import check_clean, random_prompts
from miniinfer import SamplingParams


def test_step_streams_cumulative_outputs(llama_llm):
    eng = llama_llm.engine
    p = random_prompts(1, seed=51, min_len=20, max_len=20)[0]
    eng.add_request("s1", p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    seen = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id == "s1"
            seen.append((list(out.outputs[0].token_ids), out.finished))
    assert [len(t) for t, _ in seen] == [1, 2, 3, 4, 5]
    assert all(a == b[:len(a)] for (a, _), (b, _) in zip(seen, seen[1:]))  # cumulative
    assert [f for _, f in seen] == [False] * 4 + [True]
    check_clean(llama_llm)


def test_abort_and_duplicate_ids(llama_llm):
    eng = llama_llm.engine
    prompts = random_prompts(3, seed=52, min_len=10, max_len=30)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("a1", prompts[0])
    eng.step()
    eng.step()
    eng.abort_request("a1")
    eng.abort_request("nope")  # unknown ids are ignored
    eng.check_integrity()
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != "a1"
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"a0", "a2"} and all(len(o.outputs[0].token_ids) == 50 for o in done.values())
    for rid in list(eng.requests):
        eng.abort_request(rid)
    check_clean(llama_llm)


def test_length_limits(tiny_llm):
    llm = tiny_llm("llama", max_model_len=40)
    p = random_prompts(1, seed=53, min_len=30, max_len=30)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"
    out = llm.generate([list(range(4, 43))], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    check_clean(llm)


def test_max_model_len_capped_by_kv_capacity(tiny_llm):
    llm = tiny_llm("llama", num_kv_blocks=4, block_size=16)  # 64 tokens of KV
    assert llm.engine.max_model_len == 64
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate([list(range(4, 70))], SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate([list(range(4, 54))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 14  # up to the 64-token capacity
    check_clean(llm)
