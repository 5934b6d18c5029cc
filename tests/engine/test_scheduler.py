"""Unit tests of the scheduler on its own (no model): token budget, decode-first ordering,
FCFS admission, max_num_seqs, preemption order, prefix reuse and bookkeeping."""
from __future__ import annotations

import pytest

from miniinfer.config import EngineConfig
from miniinfer.engine.kv_cache_manager import KVCacheManager
from miniinfer.engine.scheduler import Scheduler
from miniinfer.engine.sequence import Sequence, SequenceStatus
from miniinfer.sampling_params import SamplingParams

BS = 4


def make(num_blocks=64, budget=64, max_seqs=8, caching=True, chunked=True, max_len=1024):
    cfg = EngineConfig(device="cpu", block_size=BS, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                       enable_prefix_caching=caching, enable_chunked_prefill=chunked)
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(cfg, kv, max_len)


def seq(name, n, start=0):
    return Sequence(name, 0, list(range(start, start + n)), n, SamplingParams())


def step(s: Scheduler):
    """Schedule, then play the engine: sampled sequences get a token, everyone publishes."""
    out = s.schedule()
    out.samples = [x.samples for x in out.scheduled]  # (a property of the live sequence)
    for x in out.scheduled:
        if x.samples:
            x.seq.token_ids.append(7)
        s.publish(x.seq)
    s.check_integrity()
    return out


def plan(out):
    return [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled]


def test_budget_chunking_and_decodes_first():
    s = make(budget=64)
    a, b, c = seq("a", 50), seq("b", 50, 100), seq("c", 20, 200)
    for x in (a, b, c):
        s.add(x)
    out = step(s)
    assert plan(out) == [("a", 50), ("b", 14)]  # b's prefill is chunked at the budget
    assert out.samples == [True, False]
    assert out.num_tokens == 64
    out = step(s)
    # a decodes (first), b finishes its prefill, c gets the rest of the budget
    assert plan(out) == [("a", 1), ("b", 36), ("c", 20)] and out.num_tokens == 57
    assert [x.start for x in out.scheduled] == [50, 14, 0]
    out = step(s)
    assert plan(out) == [("a", 1), ("b", 1), ("c", 1)]
    assert all(x.num_computed_tokens == x.num_tokens - 1 for x in (a, b, c))


def test_no_chunking_when_disabled():
    s = make(budget=64, chunked=False)
    a, b = seq("a", 50), seq("b", 30, 100)
    s.add(a)
    s.add(b)
    assert plan(step(s)) == [("a", 50)]  # b would not fit whole: it waits
    assert plan(step(s)) == [("a", 1), ("b", 30)]


def test_max_num_seqs():
    s = make(max_seqs=2)
    seqs = [seq(f"s{i}", 5, 10 * i) for i in range(5)]
    for x in seqs:
        s.add(x)
    assert plan(step(s)) == [("s0", 5), ("s1", 5)]
    assert len(s.running) == 2 and len(s.waiting) == 3
    assert plan(step(s)) == [("s0", 1), ("s1", 1)]
    s.finish(seqs[0])
    assert plan(step(s)) == [("s1", 1), ("s2", 5)]


def test_fcfs_head_of_line_blocks():
    # 6 blocks: the big head needs 5, two small ones behind it would fit but may not overtake
    s = make(num_blocks=6)
    small0, big, small1 = seq("small0", 8), seq("big", 20, 100), seq("small1", 4, 200)
    for x in (small0, big, small1):
        s.add(x)
    out = step(s)
    assert plan(out) == [("small0", 8)]
    assert [x.request_id for x in s.waiting] == ["big", "small1"]
    assert big.block_table == [] and big.num_computed_tokens == 0  # admission undone cleanly
    s.finish(small0)
    assert plan(step(s)) == [("big", 20), ("small1", 4)]


def test_preemption_order_most_recent_first():
    # 4 one-page sequences fill 4 blocks; each first decode needs a second block
    s = make(num_blocks=4, budget=64)
    a, b, c, d = (seq(n, 4, 100 * i) for i, n in enumerate("abcd"))
    for x in (a, b, c, d):
        s.add(x)
    step(s)
    assert s.kv.num_free_blocks == 0
    out = step(s)
    # a needs a block: d (the latest admitted) goes; b needs one: c goes
    assert [x.request_id for x in out.preempted] == ["d", "c"]
    assert plan(out) == [("a", 1), ("b", 1)]
    assert s.num_preemptions == 2
    assert [x.request_id for x in s.waiting] == ["c", "d"]  # back at the front, FCFS kept
    for x in (c, d):
        assert x.status is SequenceStatus.WAITING and x.block_table == [] and x.num_computed_tokens == 0
        assert x.num_preemptions == 1 and x.num_tokens == 5  # the sampled token is kept


def test_preemption_of_itself_and_readmission_with_own_pages():
    s = make(num_blocks=3, budget=64)
    a, b, c = (seq(n, 4, 100 * i) for i, n in enumerate("abc"))
    for x in (a, b, c):
        s.add(x)
    step(s)
    out = step(s)
    # a needs a block: c goes; b needs one and is now the latest itself: it goes too
    assert [x.request_id for x in out.preempted] == ["c", "b"]
    assert plan(out) == [("a", 1)]
    assert [x.request_id for x in s.waiting] == ["b", "c"]
    # c's cached page was evicted to give a its block; b's page is cached but b needs one
    # more block, and a holds the other two: b waits
    assert plan(step(s)) == [("a", 1)]
    assert [x.request_id for x in s.waiting] == ["b", "c"]
    s.finish(a)
    # b comes back on its own cached first page: only its sampled token is computed
    out = step(s)
    assert plan(out) == [("b", 1)] and out.scheduled[0].start == 4
    assert b.num_cached_tokens == 0  # counts hits at first admission only
    s.finish(b)
    assert plan(step(s)) == [("c", 5)]  # its page is gone: recomputed in full


def test_preempted_sequence_recomputes_without_cache():
    s = make(num_blocks=6, caching=False)
    a, b = seq("a", 12), seq("b", 12, 100)
    s.add(a)
    s.add(b)
    step(s)
    out = step(s)
    assert [x.request_id for x in out.preempted] == ["b"]
    s.finish(a)
    out = step(s)
    assert plan(out) == [("b", 13)]  # prompt + its sampled token, from scratch


def test_prefix_hit_accounting_once_per_request():
    s = make(num_blocks=4)
    a = seq("a", 14)
    s.add(a)
    step(s)  # a holds all 4 blocks; its first 3 pages are published
    b = Sequence("b", 0, list(range(8)) + [900, 901], 10, SamplingParams())
    s.add(b)
    for _ in range(2):  # b finds 2 cached pages but can't get its third block: retried
        out = step(s)
        assert plan(out) == [("a", 1)] and b.status is SequenceStatus.WAITING
        assert b.block_table == [] and s.kv.ref_count[a.block_table[0]] == 1
    assert s.kv.prefix_queries == 14 and s.kv.prefix_hits == 0  # b not counted yet
    s.finish(a)
    out = step(s)
    assert plan(out) == [("b", 2)] and out.scheduled[0].start == 8
    assert b.num_cached_tokens == 8
    assert s.kv.prefix_queries == 14 + 10 and s.kv.prefix_hits == 8


def test_finish_releases_and_publishes():
    s = make(num_blocks=8)
    a = seq("a", 9)
    s.add(a)
    step(s)
    a.token_ids += [1, 2]  # pretend two more steps
    a.num_computed_tokens = a.num_tokens - 1
    s.kv.allocate(a.block_table, a.num_tokens)
    s.finish(a)
    assert a.status is SequenceStatus.FINISHED and a.block_table == [] and not s.running
    assert s.kv.num_free_blocks == 8 and s.kv.num_evictable == 2  # 11 computed tokens: 2 full pages
    s.check_integrity()
    w = seq("w", 5)
    s.add(w)
    s.finish(w)  # finishing a waiting one just drops it
    assert not s.waiting and w.status is SequenceStatus.FINISHED


def test_check_integrity_catches_waiting_with_blocks():
    s = make()
    a = seq("a", 4)
    s.add(a)
    s.kv.allocate(a.block_table, 4)
    with pytest.raises(AssertionError, match="holds blocks"):
        s.check_integrity()
