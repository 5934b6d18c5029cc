"""Unit tests of the paged KV-cache bookkeeping: allocator, ref counts, radix prefix tree,
LRU eviction and the integrity checker."""
from __future__ import annotations

import pytest

from miniinfer.engine.kv_cache_manager import KVCacheManager

BS = 4


def toks(n, start=0):
    return list(range(start, start + n))


def test_allocate_and_free():
    kv = KVCacheManager(8, BS)
    t = []
    assert kv.allocate(t, 1) and len(t) == 1
    assert kv.allocate(t, 4) and len(t) == 1  # still fits the first block
    assert kv.allocate(t, 9) and len(t) == 3
    assert all(kv.ref_count[b] == 1 for b in t)
    assert kv.num_free_blocks == 5 and kv.usage() == pytest.approx(3 / 8)
    u = []
    assert not kv.allocate(u, 6 * BS)  # needs 6, only 5 free: no change at all
    assert u == [] and kv.num_free_blocks == 5
    assert kv.allocate(u, 5 * BS) and kv.num_free_blocks == 0
    assert not kv.allocate(t, 13)
    kv.check_integrity([t, u])
    held = list(t)
    kv.free(t)
    assert t == [] and kv.num_free_blocks == 3
    assert list(kv.free_blocks) == held[::-1]  # tails first
    kv.check_integrity([u])
    kv.free(u)
    kv.check_integrity([])
    assert kv.num_free_blocks == 8 and kv.usage() == 0


def test_double_free_is_caught():
    kv = KVCacheManager(4, BS)
    t = []
    kv.allocate(t, 4)
    copy = list(t)
    kv.free(t)
    with pytest.raises(AssertionError, match="freed twice"):
        kv.free(copy)


def test_blocks_needed_and_bad_size():
    kv = KVCacheManager(4, BS)
    assert kv.blocks_needed(0, 0) == 0
    assert kv.blocks_needed(1, 0) == 1
    assert kv.blocks_needed(9, 2) == 1
    assert kv.blocks_needed(8, 3) == 0
    with pytest.raises(ValueError, match="num_kv_blocks"):
        KVCacheManager(0, BS)


def test_insert_and_match_prefix():
    kv = KVCacheManager(10, BS)
    seq = toks(11)
    t = []
    kv.allocate(t, 11)
    cur = kv.insert(seq, t, 11)  # 2 full pages published; the partial third one is not
    assert cur.num_blocks == 2 and set(kv.node_of_block) == set(t[:2])
    kv.check_integrity([t])
    # a second prompt sharing 9 tokens finds the 2 pages
    other = toks(9) + [99, 98, 97]
    hit = kv.match_prefix(other, len(other) - 1)
    assert hit == t[:2] and kv.ref_count[t[0]] == 2
    # never more than max_tokens, whole pages only
    assert kv.match_prefix(seq, 7) == t[:1]
    assert kv.match_prefix([0, 1, 2, 5], 3) == []
    kv.check_integrity([t, hit, t[:1]])
    kv.free(hit)
    kv.ref_count[t[0]] -= 1  # drop the max_tokens=7 hit by hand
    kv.check_integrity([t])
    # finishing the owner leaves its pages cached (evictable), the rest free
    kv.free(t)
    assert kv.num_evictable == 2 and len(kv.free_blocks) == 8 and kv.num_free_blocks == 10
    kv.check_integrity([])
    hit = kv.match_prefix(seq, 10)
    assert len(hit) == 2 and kv.num_evictable == 0 and kv.num_free_blocks == 8
    kv.check_integrity([hit])


def test_insert_with_cursor_is_incremental():
    kv = KVCacheManager(10, BS)
    seq = toks(5)
    t = []
    kv.allocate(t, 5)
    cur = kv.insert(seq, t, 3)
    assert cur.num_blocks == 0 and not kv.node_of_block
    cur = kv.insert(seq, t, 5, cur)
    assert cur.num_blocks == 1 and cur.node.block_id == t[0]
    for tok in range(5, 13):  # decode steps: one token each
        seq.append(tok)
        kv.allocate(t, len(seq))
        cur = kv.insert(seq, t, len(seq) - 1, cur)
    assert cur.num_blocks == 3 and set(kv.node_of_block) == set(t[:3])
    # the tree path spells the tokens
    node, path = cur.node, []
    while node is not kv.root:
        path = list(node.tokens) + path
        node = node.parent
    assert path == seq[:12]
    kv.check_integrity([t])


def test_duplicate_pages_stop_publishing():
    kv = KVCacheManager(10, BS)
    a, b = [], []
    kv.allocate(a, 8)
    kv.allocate(b, 12)
    kv.insert(toks(8), a, 8)
    cur = kv.insert(toks(12), b, 12)  # same first page computed twice in another block
    assert cur.stopped and cur.num_blocks == 0
    assert set(kv.node_of_block) == set(a)
    assert kv.insert(toks(12), b, 12, cur) is cur  # stays stopped
    kv.check_integrity([a, b])
    kv.free(a)
    kv.free(b)
    kv.check_integrity([])
    assert kv.num_evictable == 2


def test_disabled_prefix_caching():
    kv = KVCacheManager(6, BS, enable_prefix_caching=False)
    t = []
    kv.allocate(t, 8)
    assert kv.insert(toks(8), t, 8) is None and not kv.node_of_block
    assert kv.match_prefix(toks(8), 8) == []
    kv.free(t)
    assert len(kv.free_blocks) == 6
    kv.check_integrity([])


def _cache_chain(kv, tokens):
    t = []
    assert kv.allocate(t, len(tokens))
    kv.insert(tokens, t, len(tokens))
    blocks = list(t)
    kv.free(t)
    return blocks


def test_lru_eviction_order():
    kv = KVCacheManager(6, BS)
    a = _cache_chain(kv, toks(8, 0))  # 2 pages
    b = _cache_chain(kv, toks(8, 100))  # 2 pages
    c = _cache_chain(kv, toks(4, 200))  # 1 page
    assert kv.num_evictable == 5 and list(kv.free_blocks) == [5]
    # touch `a` (a prefix hit), release it again: now b's and c's pages are older
    hit = kv.match_prefix(toks(8, 0) + [1], 8)
    assert hit == a
    kv.free(hit)
    held = []
    for _ in range(5):  # one block at a time, each kept: every allocation must find one
        t = []
        assert kv.allocate(t, 1)
        held.append(t)
    # the free block first, then least recently used leaves; a parent only once it is a leaf
    assert [t[0] for t in held] == [5, b[1], b[0], c[0], a[1]]
    assert set(kv.node_of_block) == {a[0]}
    kv.check_integrity(held)
    assert not kv.allocate([], 2 * BS)


def test_eviction_keeps_referenced_and_parent_pages():
    kv = KVCacheManager(4, BS)
    seq = toks(12)
    t = []
    kv.allocate(t, 12)
    kv.insert(seq, t, 12)
    pages = list(t)
    kv.free(t)  # 3 cached pages, 1 free block
    hit = kv.match_prefix(seq, 5)  # holds the first page only
    assert hit == pages[:1]
    u = []
    assert kv.allocate(u, 3 * BS)  # the free block + the two unreferenced pages (tail first)
    assert u == [3, pages[2], pages[1]]
    assert set(kv.node_of_block) == {pages[0]}
    assert not kv.allocate([], 1)  # the referenced page can't be evicted
    kv.check_integrity([hit, u])


def test_reset_prefix_cache():
    kv = KVCacheManager(6, BS)
    _cache_chain(kv, toks(8))
    held = []
    kv.allocate(held, 4)
    kv.insert(toks(4, 50), held, 4)
    kv.reset_prefix_cache()
    assert not kv.node_of_block and kv.num_evictable == 0
    assert kv.match_prefix(toks(8) + [0], 8) == []
    assert len(kv.free_blocks) == 5  # the held block stays in use
    kv.check_integrity([held])


@pytest.mark.parametrize("corruption", ["refcount", "free_twice", "free_and_cached", "evictable", "leak",
                                        "tree_index", "missing_table"])
def test_check_integrity_catches_corruption(corruption):
    kv = KVCacheManager(8, BS)
    cached = _cache_chain(kv, toks(8))
    t = []
    kv.allocate(t, 6)
    kv.check_integrity([t])
    tables = [t]
    if corruption == "refcount":
        kv.ref_count[t[0]] += 1
    elif corruption == "free_twice":
        kv.free_blocks.append(kv.free_blocks[0])
    elif corruption == "free_and_cached":
        kv.free_blocks.append(cached[0])
    elif corruption == "evictable":
        kv.num_evictable += 1
    elif corruption == "leak":
        kv.free_blocks.popleft()
    elif corruption == "tree_index":
        del kv.node_of_block[cached[1]]
    elif corruption == "missing_table":
        tables = []
    with pytest.raises(AssertionError):
        kv.check_integrity(tables)
