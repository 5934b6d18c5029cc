"""Paged KV-cache bookkeeping: a block allocator with reference counts and a radix tree of
cached prefixes (page granularity), shared by all sequences.

Every block is in exactly one of three states::

    free ──allocate──▶ in use (ref ≥ 1) ──last ref dropped──▶ free          (not in the tree)
                           │  ▲                         └──▶ cached (ref 0, in the tree)
                           │  └────── prefix hit ──────────────┘   │
                           └─ inserted into the tree (stays in use) └─evicted (LRU leaf)──▶ free

The tree's edges are full pages: a node holds the ``block_size`` token ids of one block and
that block's id; a path from the root spells a cached token prefix.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    tokens: tuple[int, ...]
    block_id: int
    parent: "RadixNode | None"
    children: dict[tuple[int, ...], "RadixNode"] = field(default_factory=dict)
    last_access: int = 0


@dataclass(eq=False)
class PublishCursor:
    node: RadixNode  # deepest node published for the sequence (it holds a ref to its block)
    num_blocks: int
    stopped: bool = False


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.root = RadixNode((), -1, None)
        self.node_of_block: dict[int, RadixNode] = {}  # blocks held by the tree
        self.num_evictable = 0  # tree blocks with ref 0
        self._lru: list[tuple[int, int]] = []  # lazy heap of evictable leaves, see _evict_one
        self._clock = itertools.count(1)
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    # --- capacity -----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get: free ones plus unreferenced cached ones."""
        return len(self.free_blocks) + self.num_evictable

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    # --- allocation -----------------------------------------------------------------
    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` to hold ``num_tokens`` tokens; False (and no change) if it can't."""
        need = self.blocks_needed(num_tokens, len(block_table))
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            if not self.free_blocks:
                self._evict_one()
            b = self.free_blocks.popleft()
            self.ref_count[b] = 1
            block_table.append(b)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block (in reverse, so tails are evicted before heads)."""
        for b in reversed(block_table):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} freed twice"
            if self.ref_count[b] == 0:
                node = self.node_of_block.get(b)
                if node is not None:
                    self.num_evictable += 1
                    if not node.children:
                        heapq.heappush(self._lru, (node.last_access, b))
                else:
                    self.free_blocks.append(b)
        block_table.clear()

    def share(self, block_table: list[int], blocks: list[int]) -> None:
        """Append ``blocks`` (held by another sequence) to ``block_table``, one reference each."""
        for b in blocks:
            self._ref(b)
        block_table.extend(blocks)

    def _ref(self, b: int) -> None:
        if self.ref_count[b] == 0 and b in self.node_of_block:
            self.num_evictable -= 1
        self.ref_count[b] += 1

    # --- prefix cache ---------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Longest cached prefix of whole pages, at most ``max_tokens`` tokens; the blocks are
        referenced for the caller (append them to its block table)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        node, blocks = self.root, []
        now = next(self._clock)
        for start in range(0, max_tokens - bs + 1, bs):
            child = node.children.get(tuple(token_ids[start:start + bs]))
            if child is None:
                break
            child.last_access = now
            self._ref(child.block_id)
            blocks.append(child.block_id)
            node = child
        return blocks

    def record_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def insert(self, token_ids: list[int], block_table: list[int], num_tokens: int,
               cursor: "PublishCursor | None" = None) -> "PublishCursor | None":
        """Publish the full pages among the first ``num_tokens`` tokens (their K/V is computed).

        ``cursor`` (returned by the previous call for the same sequence) resumes where that call
        stopped, so a decode step costs O(1) here. Returns the new cursor, or None once this
        sequence's pages duplicate another sequence's (nothing more of it is published)."""
        if not self.enable_prefix_caching:
            return None
        if cursor is None:
            cursor = PublishCursor(self.root, 0)
        elif cursor.stopped:
            return cursor
        bs = self.block_size
        now = next(self._clock)
        node, i = cursor.node, cursor.num_blocks
        while i < num_tokens // bs:
            b = block_table[i]
            child = self.node_of_block.get(b)
            if child is not None and child.parent is node:  # a page this sequence shares: no key to build
                child.last_access = now
                node, i = child, i + 1
                continue
            key = tuple(token_ids[i * bs:(i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                child = RadixNode(key, b, node)
                node.children[key] = child
                self.node_of_block[b] = child
            elif child.block_id != b:
                cursor.stopped = True  # same tokens computed twice: keep the first copy
                break
            child.last_access = now
            node, i = child, i + 1
        cursor.node, cursor.num_blocks = node, i
        return cursor

    def _evict_one(self) -> None:
        """Free the least recently used unreferenced leaf.

        ``_lru`` is a lazy heap of (last_access, block): entries go stale when the block is
        referenced again, gains children or is touched; stale ones are skipped, and if the
        heap runs dry the candidates are collected afresh."""
        while True:
            if not self._lru:
                self._lru = [(n.last_access, b) for b, n in self.node_of_block.items()
                             if self.ref_count[b] == 0 and not n.children]
                heapq.heapify(self._lru)
                assert self._lru, "no evictable block although num_evictable > 0"
            access, b = heapq.heappop(self._lru)
            node = self.node_of_block.get(b)
            if (node is not None and self.ref_count[b] == 0 and not node.children
                    and node.last_access == access):
                break
        parent = node.parent
        del parent.children[node.tokens]
        del self.node_of_block[b]
        self.num_evictable -= 1
        self.free_blocks.append(b)
        if parent is not self.root and not parent.children and self.ref_count[parent.block_id] == 0:
            heapq.heappush(self._lru, (parent.last_access, parent.block_id))

    def reset_prefix_cache(self) -> None:
        for b, node in list(self.node_of_block.items()):
            if self.ref_count[b] == 0:
                self.free_blocks.append(b)
        self.node_of_block.clear()
        self.root = RadixNode((), -1, None)
        self.num_evictable = 0
        self._lru = []

    # --- invariants -----------------------------------------------------------------
    def check_idle(self) -> None:
        """O(1) check for an engine with no sequence: every block is free or cached."""
        assert self.num_evictable == len(self.node_of_block), "a cached block is still referenced"
        assert len(self.free_blocks) + self.num_evictable == self.num_blocks, (
            f"{self.num_blocks - len(self.free_blocks) - self.num_evictable} blocks leaked")

    def check_integrity(self, block_tables: list[list[int]]) -> None:
        """Every block is free, cached or referenced, exactly once; ref counts equal the number
        of tables holding the block. Raises AssertionError on the first violation."""
        refs = [0] * self.num_blocks
        for table in block_tables:
            for b in table:
                refs[b] += 1
        assert refs == self.ref_count, "ref counts disagree with the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        tree_blocks = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                assert child.parent is node and child.tokens == key, "tree links broken"
                assert self.node_of_block.get(child.block_id) is child, "tree and index disagree"
                assert child.block_id not in tree_blocks, f"block {child.block_id} twice in tree"
                tree_blocks.add(child.block_id)
                stack.append(child)
        assert tree_blocks == set(self.node_of_block), "tree index holds unreachable nodes"
        assert not (free & tree_blocks), "a cached block is also free"
        for b in range(self.num_blocks):
            states = (b in free) + (self.ref_count[b] > 0) + (b in tree_blocks and self.ref_count[b] == 0)
            assert states == 1 or (b in tree_blocks and self.ref_count[b] > 0 and b not in free), \
                f"block {b} is in {states} states"
            assert b in free or b in tree_blocks or self.ref_count[b] > 0, f"block {b} leaked"
        evictable = sum(1 for b in tree_blocks if self.ref_count[b] == 0)
        assert evictable == self.num_evictable, "evictable count is off"
