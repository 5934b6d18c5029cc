"""Continuous batching: many requests together (chunked prefill, preemption, prefix caching,
eviction) give exactly what each gives alone."""
from __future__ import annotations

import pytest

from helpers import assert_greedy_equal, check_clean, engine_logits_fn, random_prompts
from miniinfer import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16)


def _record_steps(llm):
    """Wrap the scheduler so that every step's plan is recorded as a list of
    (num_new_tokens, start, samples) per scheduled sequence."""
    sched = llm.engine.scheduler
    steps = []
    orig = sched.schedule

    def schedule():
        out = orig()
        steps.append([(s.num_new_tokens, s.start, s.samples) for s in out.scheduled])
        return out

    sched.schedule = schedule
    return steps


def _count_evictions(llm):
    kv = llm.engine.kv
    counter = [0]
    orig = kv._evict_one

    def evict():
        counter[0] += 1
        orig()

    kv._evict_one = evict
    return counter


def _alone(llm, prompts, params=GREEDY):
    outs = []
    for p in prompts:
        outs.append(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
    check_clean(llm)
    return outs


@pytest.fixture(scope="module")
def prompts():
    # 36 prompts: mostly short, a few longer than the per-step token budget (chunked prefill)
    return (random_prompts(30, seed=1, min_len=2, max_len=40)
            + random_prompts(6, seed=2, min_len=70, max_len=150))


@pytest.fixture(scope="module")
def alone(prompts, tiny_llm):
    return _alone(tiny_llm("llama", enable_prefix_caching=False), prompts)


@pytest.mark.parametrize("block_size,overlap", [(16, True), (4, True), (16, False)])
def test_batch_equals_alone_under_pressure(prompts, alone, tiny_llm, block_size, overlap):
    # 256 tokens of KV for 36 sequences of up to ~166 tokens: preemption is certain
    llm = tiny_llm("llama", max_num_batched_tokens=64, num_kv_blocks=256 // block_size,
                   block_size=block_size, enable_prefix_caching=False, overlap_scheduling=overlap)
    steps = _record_steps(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts  # input order
    for p, o, ref in zip(prompts, outs, alone):
        assert o.finished and o.outputs[0].finish_reason in ("length", "stop")
        assert_greedy_equal(o.outputs[0].token_ids, ref, p, engine_logits_fn(llm))
    st = llm.engine.stats()
    assert st["num_preemptions"] > 0, st
    assert all(sum(n for n, _, _ in step) <= 64 for step in steps)
    # some step mixed decodes with a prefill chunk, and some prefill was split over steps
    assert any(any(n == 1 for n, _, _ in s) and any(n > 1 for n, _, _ in s) for s in steps)
    assert any(n > 1 and not samples for s in steps for n, _, samples in s)
    # decodes come first in every step
    for s in steps:
        kinds = [n == 1 for n, _, _ in s]
        assert kinds == sorted(kinds, reverse=True)
    check_clean(llm)


def test_batch_mixed_lengths_in_order(prompts, alone, tiny_llm):
    """Per-prompt params: later prompts finish first; results still come back in input order."""
    llm = tiny_llm("llama", max_num_batched_tokens=48, num_kv_blocks=40, max_num_seqs=6)
    params = [SamplingParams(temperature=0, max_tokens=16 - (i % 12)) for i in range(len(prompts))]
    steps = _record_steps(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, o, ref, sp in zip(prompts, outs, alone, params):
        toks = o.outputs[0].token_ids
        assert len(toks) <= sp.max_tokens
        assert_greedy_equal(toks, ref[:len(toks)], p, engine_logits_fn(llm))
    assert max(len(s) for s in steps) <= 6  # max_num_seqs
    check_clean(llm)


def test_engine_reusable_after_batches(prompts, alone, llama_llm):
    """The shared engine serves batch after batch with nothing leaking."""
    for _ in range(2):
        outs = llama_llm.generate(prompts[:8], GREEDY, use_tqdm=False)
        for p, o, ref in zip(prompts, outs, alone):
            assert_greedy_equal(o.outputs[0].token_ids, ref, p, engine_logits_fn(llama_llm))
        check_clean(llama_llm)


# --- prefix caching ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_prefix_prompts():
    """32 prompts over 4 long shared prefixes (37..61 tokens) with short distinct tails."""
    heads = random_prompts(4, seed=3, min_len=37, max_len=61)
    tails = random_prompts(32, seed=4, min_len=1, max_len=12)
    return [heads[i % 4] + tails[i] for i in range(32)]


@pytest.fixture(scope="module")
def shared_alone(shared_prefix_prompts, tiny_llm):
    return _alone(tiny_llm("qwen2", enable_prefix_caching=False), shared_prefix_prompts)


@pytest.mark.parametrize("caching,overlap", [(True, True), (False, True), (True, False), (False, False)])
def test_shared_prefixes_under_kv_pressure(caching, overlap, shared_prefix_prompts, shared_alone, tiny_llm):
    llm = tiny_llm("qwen2", max_num_batched_tokens=64, num_kv_blocks=48, block_size=8,
                   enable_prefix_caching=caching, overlap_scheduling=overlap)
    evictions = _count_evictions(llm)
    outs = llm.generate(shared_prefix_prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == shared_prefix_prompts
    for p, o, ref in zip(shared_prefix_prompts, outs, shared_alone):
        assert_greedy_equal(o.outputs[0].token_ids, ref, p, engine_logits_fn(llm))
    st = llm.engine.stats()
    assert st["num_preemptions"] > 0, st
    if caching:
        assert st["prefix_cache_hits"] > 0 and sum(o.num_cached_tokens for o in outs) > 0
        assert evictions[0] > 0  # the cache filled up and old pages had to go
        assert st["prefix_cache_queries"] == sum(len(p) for p in shared_prefix_prompts)
        assert st["prefix_cache_hits"] == sum(o.num_cached_tokens for o in outs)
    else:
        assert st["prefix_cache_hits"] == 0 and all(o.num_cached_tokens == 0 for o in outs)
        assert evictions[0] == 0
    check_clean(llm)

    # A second round over the warm cache gives the same outputs again.
    outs2 = llm.generate(shared_prefix_prompts[:8], GREEDY, use_tqdm=False)
    for p, o, ref in zip(shared_prefix_prompts, outs2, shared_alone):
        assert_greedy_equal(o.outputs[0].token_ids, ref, p, engine_logits_fn(llm))
    check_clean(llm)


def test_repeated_prompt_hits_cache(tiny_llm):
    llm = tiny_llm("qwen3", block_size=8)
    prompt = random_prompts(1, seed=5, min_len=45, max_len=45)[0]
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    # all full pages but never the last token: 45 tokens -> 5 pages of 8 = 40
    assert second.num_cached_tokens == 40
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # the first run's generated tokens were published too: prompt + its output hits further
    longer = prompt + first.outputs[0].token_ids
    third = llm.generate([longer], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert third.num_cached_tokens == 56  # 61 tokens: 7 full pages, of which the K/V of 7 exist
    st = llm.engine.stats()
    assert st["prefix_cache_hits"] == 40 + 56
    assert st["prefix_cache_queries"] == 45 + 45 + 61
    check_clean(llm)
    # a different prompt sharing only the first page
    other = prompt[:8] + [t + 1 for t in prompt[8:]]
    o = llm.generate([other], GREEDY, use_tqdm=False)[0]
    assert o.num_cached_tokens == 8
    check_clean(llm)


def test_forward_logits_leaves_cache_intact(tiny_llm):
    """forward_logits (a test hook) must not clobber cached prefix pages."""
    llm = tiny_llm("llama")
    prompt = random_prompts(1, seed=6, min_len=60, max_len=60)[0]
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    llm.engine.runner.forward_logits(random_prompts(1, seed=7, min_len=70, max_len=70)[0])
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens == 48
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_overlap_keeps_one_step_in_flight(tiny_llm):
    """With overlap on, step() returns while its own step's tokens are still placeholders and
    hands back the previous step's results; penalties force the synchronous path."""
    from miniinfer import SamplingParams
    for overlap in (True, False):
        llm = tiny_llm("llama", overlap_scheduling=overlap)
        eng = llm.engine
        eng.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6))
        first = eng.step()  # prefill launched
        seq = eng.requests["a"].seqs[0]
        if overlap:
            assert first == [] and eng.inflight is not None and seq.num_pending == 1
            assert seq.token_ids[-1] < 0 and seq.output_token_ids == []
        else:
            assert eng.inflight is None and seq.num_pending == 0 and len(first[0].outputs[0].token_ids) == 1
        while eng.has_unfinished_requests():
            eng.step()
        assert seq.num_pending == 0 and all(t >= 0 for t in seq.token_ids)
        assert len(seq.output_token_ids) == 6
        check_clean(llm)
    # penalties: every step is launched with all of its sequences' tokens known on the host
    llm = tiny_llm("llama", overlap_scheduling=True)
    eng = llm.engine
    launch, pending_at_launch = eng.runner.launch, []

    def spy(sched, prev):
        pending_at_launch.extend(s.seq.num_pending for s in sched.scheduled)
        return launch(sched, prev)

    eng.runner.launch = spy
    eng.add_request("p", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3))
    while eng.has_unfinished_requests():
        eng.step()
    assert len(pending_at_launch) == 4 and not any(pending_at_launch)
    check_clean(llm)


def _spy_launch(llm) -> list[int]:
    """Tokens computed per launched step (appended as steps launch)."""
    computed = []
    launch = llm.engine.runner.launch

    def spy(sched, prev):
        computed.append(sched.num_tokens)
        return launch(sched, prev)
    llm.engine.runner.launch = spy
    return computed


def _prefix_prompts(n: int = 8, prefix_len: int = 64, tail: int = 10) -> list[list[int]]:
    prefix = random_prompts(1, seed=7, min_len=prefix_len, max_len=prefix_len)[0]
    return [prefix + t for t in random_prompts(n, seed=8, min_len=tail, max_len=tail)]


def test_shared_prefix_computed_once_when_submitted_together(tiny_llm):
    """Requests that arrive together with one long common prefix: the first computes it and
    the others share its pages in the same step (the forward stores all K/V before attending),
    computing only their own tails; greedy outputs equal those without a prefix cache."""
    from miniinfer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=4)
    prompts = _prefix_prompts()
    want = [o.outputs[0].token_ids for o in tiny_llm("qwen2", block_size=8, enable_prefix_caching=False)
            .generate(prompts, params, use_tqdm=False)]
    llm = tiny_llm("qwen2", block_size=8, max_num_batched_tokens=512)
    computed = _spy_launch(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0] + [64] * 7
    assert computed[0] == 74 + 7 * 10  # the prompt once and every tail, in one step
    assert sum(computed) == 74 + 7 * 10 + 8 * 3  # then the decodes
    assert [o.outputs[0].token_ids for o in outs] == want
    check_clean(llm)


def test_shared_prefix_waits_a_step_with_in_step_sharing_off(tiny_llm, monkeypatch):
    """MINIINFER_SHARE_IN_STEP=0 (the A/B baseline): the others wait a step for the pages."""
    from miniinfer import SamplingParams
    from miniinfer.engine import scheduler
    monkeypatch.setattr(scheduler, "SHARE_IN_STEP", False)
    llm = tiny_llm("qwen2", block_size=8, max_num_batched_tokens=512)
    computed = _spy_launch(llm)
    outs = llm.generate(_prefix_prompts(), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0] + [64] * 7
    assert computed[0] == 74  # only the first request's prompt in the first step
    assert sum(computed) == 74 + 7 * 10 + 8 * 3
    check_clean(llm)


def test_in_step_sharing_from_a_chunk_of_a_longer_prefill(tiny_llm):
    """The first prompt is chunked (50-token budget): the second shares the pages its second
    chunk completes, computes only its tail, and both give the outputs they give alone."""
    from miniinfer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=4)
    prompts = _prefix_prompts(n=2)
    alone = [tiny_llm("qwen2", block_size=8, enable_prefix_caching=False).generate([p], params, use_tqdm=False)[0]
             .outputs[0].token_ids for p in prompts]
    llm = tiny_llm("qwen2", block_size=8, max_num_batched_tokens=50)
    computed = _spy_launch(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert computed[:2] == [50, 24 + 10]  # 2nd step: the first prompt's rest + the second's tail
    assert outs[1].num_cached_tokens == 64  # 48 published after step 1, 16 shared in step 2
    assert [o.outputs[0].token_ids for o in outs] == alone
    check_clean(llm)


def test_failed_step_does_not_publish_shared_pages(tiny_llm):
    """A step that fails at launch leaves no page of it in the prefix cache, the shared ones
    included, and the engine serves the same prompts correctly afterwards."""
    import pytest
    from miniinfer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=4)
    prompts = _prefix_prompts(n=4)
    llm = tiny_llm("qwen2", block_size=8, max_num_batched_tokens=512)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.kv.reset_prefix_cache()
    launch = llm.engine.runner.launch

    def boom(sched, prev):
        llm.engine.runner.launch = launch
        raise RuntimeError("launch failed")
    llm.engine.runner.launch = boom
    with pytest.raises(RuntimeError, match="launch failed"):
        llm.generate(prompts, params, use_tqdm=False)
    check_clean(llm)
    assert not llm.engine.kv.node_of_block  # nothing was computed: nothing published
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    check_clean(llm)


def test_in_step_sharing_needs_the_whole_token_prefix(tiny_llm):
    """Same page tokens at the same page index after a *different* prefix hold different K/V:
    B (cached prefix Y) must not share A's pages of P (computed after X)."""
    from miniinfer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=4)
    x, y, p, z, ta, tb = random_prompts(6, seed=11, min_len=16, max_len=16)
    a, b = x + p + ta[:5], y + p + tb[:5]
    alone = [tiny_llm("qwen2", block_size=8, enable_prefix_caching=False).generate([q], params, use_tqdm=False)[0]
             .outputs[0].token_ids for q in (a, b)]
    llm = tiny_llm("qwen2", block_size=8, max_num_batched_tokens=512)
    llm.generate([y + z], params, use_tqdm=False)  # caches Y's two pages
    computed = _spy_launch(llm)
    outs = llm.generate([a, b], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 16]  # B: Y only, not A's pages of P
    assert computed[0] == len(a) + len(b) - 16  # and B does not wait for pages it can't use
    assert [o.outputs[0].token_ids for o in outs] == alone
    check_clean(llm)
