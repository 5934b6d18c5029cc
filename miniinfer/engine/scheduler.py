"""Continuous batching with chunked prefill, prefix reuse and preemption by recompute.

Each step the scheduler hands every running sequence the tokens it still lacks in the KV
cache (one for a decode, a chunk for a prefill), under a per-step token budget, then admits
waiting sequences FCFS while budget, sequence slots and KV blocks last. A sequence that can't
get a block preempts the most recently admitted running one (its blocks are freed and it
goes back to the front of the queue to be recomputed).

Prompts that share a prefix with a prefill chunk of the same step share its pages at once
(``_borrow``): every attention backend stores all of a step's K/V before any token attends, so
a later sequence in the batch reads pages the step itself computes. Those that would still
need a page another chunk computes wait one step. ``MINIINFER_SHARE_IN_STEP=0``: always wait
(A/B).
"""
from __future__ import annotations

import os
from collections import deque

from miniinfer.config import EngineConfig
from miniinfer.engine.kv_cache_manager import KVCacheManager
from miniinfer.engine.sequence import Sequence, SequenceStatus
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput


SHARE_IN_STEP = os.environ.get("MINIINFER_SHARE_IN_STEP", "1") != "0"


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCacheManager, max_model_len: int):
        self.cfg = cfg
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens

        # 1. Running sequences, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0 or self._surely_finishing(seq):
                i += 1
                continue
            draft, seq.spec_token_ids = seq.spec_token_ids, []
            parents, seq.spec_parents = seq.spec_parents, None
            if n == 1 and draft:  # speculative verify: the drafts ride along if they fit now
                draft = draft[:budget - 1]  # (a tree's drafts are in topological order: still a tree)
                if draft and self.kv.allocate(seq.block_table, seq.num_computed_tokens + 1 + len(draft)):
                    parents = parents[:len(draft)] if parents is not None else None
                    out.scheduled.append(ScheduledSeq(seq, 1 + len(draft), seq.num_computed_tokens, draft, parents))
                    budget -= 1 + len(draft)
                    i += 1
                    continue
            while not self.kv.allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing later in the list is left either
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
            i += 1

        # 2. Waiting sequences, FCFS, unless this step already had to preempt.
        in_progress = self._pages_in_progress(out.scheduled) if self.kv.enable_prefix_caching else None
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_table
            borrowed = 0
            if fresh:
                # Reuse cached full pages; always leave at least one token to compute.
                hit = self.kv.match_prefix(seq.token_ids, seq.num_tokens - 1)
                seq.block_table.extend(hit)
                if in_progress and SHARE_IN_STEP:
                    borrowed = self._borrow(seq, len(hit), in_progress)
                seq.num_computed_tokens = (len(hit) + borrowed) * self.kv.block_size
                if in_progress and self._owner(seq, len(hit) + borrowed, in_progress) is not None:
                    # Another sequence is computing this very prefix now, past what could be
                    # shared: wait one step and reuse its pages instead of computing them twice.
                    self._release(seq)
                    break
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not self.cfg.enable_chunked_prefill:
                self._release(seq)
                break
            if not self.kv.allocate(seq.block_table, seq.num_computed_tokens + n):
                self._release(seq)
                break
            if fresh and seq.num_preemptions == 0:
                # counted once, when admitted (a failed admission is retried next step)
                seq.num_cached_tokens = seq.num_computed_tokens
                self.kv.record_query(seq.num_prompt_tokens, seq.num_computed_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens,
                                              num_borrowed_tokens=borrowed * self.kv.block_size))
            budget -= n
            if in_progress is not None:
                for key, owner in self._pages_in_progress(out.scheduled[-1:]).items():
                    in_progress.setdefault(key, owner)

        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # decodes first (stable); drafts count as extends
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
        return out

    def publish(self, seq: Sequence) -> None:
        """Make the sequence's computed (or launched: the device runs steps in order) full pages
        findable by later prompts, up to its first token still unknown on the host."""
        known = min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending)
        seq.prefix_cursor = self.kv.insert(seq.token_ids, seq.block_table, known, seq.prefix_cursor)

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.prefix_cursor = None

    def _next_page_key(self, seq: Sequence, page: int) -> tuple | None:
        bs = self.kv.block_size
        if (page + 1) * bs > seq.num_tokens - 1:
            return None
        return (page, tuple(seq.token_ids[page * bs:(page + 1) * bs]))

    def _pages_in_progress(self, scheduled: list[ScheduledSeq]) -> dict[tuple, ScheduledSeq]:
        """(page index, page tokens) of the full pages that this step's prefill chunks compute,
        each with the first chunk computing it (verify steps' drafts are not prefill)."""
        bs = self.kv.block_size
        keys: dict[tuple, ScheduledSeq] = {}
        for s in scheduled:
            if s.num_new_tokens == 1 or s.draft_token_ids:
                continue
            last = min((s.start + s.num_new_tokens - 1) // bs, s.seq.num_tokens // bs - 1)
            for page in range(s.start // bs, last + 1):
                keys.setdefault((page, tuple(s.seq.token_ids[page * bs:(page + 1) * bs])), s)
        return keys

    def _owner(self, seq: Sequence, page: int, in_progress: dict[tuple, ScheduledSeq]) -> ScheduledSeq | None:
        """The chunk of this step computing ``seq``'s page ``page`` after the same token prefix."""
        owner = in_progress.get(self._next_page_key(seq, page))
        n = page * self.kv.block_size
        return owner if owner is not None and seq.token_ids[:n] == owner.seq.token_ids[:n] else None

    def _borrow(self, seq: Sequence, hit: int, in_progress: dict[tuple, ScheduledSeq]) -> int:
        """Share with ``seq`` (a fresh prompt whose first ``hit`` pages were cache hits) the
        following pages that a prefill chunk of this step computes for a sequence with the same
        tokens up to there: the pages of the same token prefix hold the same K/V, and this step
        stores them before anything attends. Only pages that chunk completes and whose tokens
        are known, and never ``seq``'s last token. Returns the number of pages shared."""
        owner = self._owner(seq, hit, in_progress)
        if owner is None:
            return 0
        bs, o = self.kv.block_size, owner.seq
        end = min((owner.start + owner.num_new_tokens) // bs,  # full pages computed by the end of the step
                  (o.num_tokens - o.num_pending) // bs, (seq.num_tokens - 1) // bs)
        if end <= hit:
            return 0
        page = end if seq.token_ids[hit * bs:end * bs] == o.token_ids[hit * bs:end * bs] else hit
        while page < end and seq.token_ids[page * bs:(page + 1) * bs] == o.token_ids[page * bs:(page + 1) * bs]:
            page += 1
        self.kv.share(seq.block_table, o.block_table[hit:page])
        return page - hit

    def _surely_finishing(self, seq: Sequence) -> bool:
        """A pending token (overlap) will end this sequence by length: don't compute past it."""
        if not seq.num_pending:
            return False
        n_out = seq.num_tokens - seq.num_prompt_tokens
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and n_out >= max_tokens) or seq.num_tokens >= self.max_model_len

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        seq.spec_token_ids, seq.spec_parents = [], None  # drafted for blocks it no longer has
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence's blocks, publishing its pages first."""
        if seq.status is SequenceStatus.RUNNING and seq in self.running:  # (a retry after a failure)
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.drop_pending()
        self.publish(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def check_integrity(self) -> None:
        tables = [s.block_table for s in self.running] + [s.block_table for s in self.waiting]
        self.kv.check_integrity(tables)
        for s in self.waiting:
            assert not s.block_table and s.num_computed_tokens == 0, f"waiting {s} holds blocks"
        for s in self.running:
            assert len(s.block_table) * self.kv.block_size >= s.num_computed_tokens, f"{s} lacks blocks"
