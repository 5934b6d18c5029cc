"""A step's grammar work on a thread of its own, beside the engine thread's output processing.

With overlap scheduling, a step N that samples constrained rows runs: launch N's forward;
collect N-1's tokens; process N-1 (detokenize, stop checks, each matcher accepts its token);
fill N's mask rows; sample N. On a small model at batch 64 that host path is longer than the
forward, so the matcher work (accept + fill, ~2 ms of CPU for 64 rows of Qwen2's vocabulary in
the §10 schema) added to the step in full. Here it starts on the grammar thread as soon as
N-1's tokens are on the host: each matcher accepts its committed token (one
``BatchGrammarMatcher.batch_accept_token`` call), then N's rows are filled (the fill threads),
while the engine thread detokenizes N-1; ``OutputProcessor.process`` joins it before it builds
outputs. xgrammar's calls release the GIL; the grammar thread needs the GIL only between them,
so the switch interval is lowered while it runs (the engine thread runs Python meanwhile, and
at the default 5 ms every hand-over would wait that long).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Executor
from typing import Callable

import torch

GIL_SWITCH_INTERVAL_S = 1e-4


class GrammarAdvance:
    """Started by ``StructuredOutputManager.start_advance``: each of ``seqs`` accepts its
    committed token ``tokens[j]``, then ``host[rows]`` (int32 bitmask rows of the next step,
    row i for ``fill_seqs[i]``) are filled. A row whose matcher rejected its token or
    terminated is set to all-allowed (-1): its sequence finishes before it samples, and no row
    may be all -inf."""

    def __init__(self, seqs: list, tokens: list[int], fill_seqs: list, rows: list[int], host: torch.Tensor,
                 fill: Callable[[list, torch.Tensor, list[int]], None], executor: Executor):
        self.seqs, self.tokens = seqs, tokens
        self.fill_seqs, self.rows, self.host = fill_seqs, rows, host
        self.accepted: list[bool] = []
        self.terminated: list[bool] = []
        self.fill_us = 0.0  # the fill's wall time on the grammar thread
        self._covered = {id(s) for s in seqs}
        self._switch = sys.getswitchinterval()
        self._joined = False
        sys.setswitchinterval(min(self._switch, GIL_SWITCH_INTERVAL_S))
        self._future = executor.submit(self._run, fill)

    def covers(self, seq) -> bool:
        """Whether ``seq``'s matcher is advanced here (the output processor must not advance it)."""
        return id(seq) in self._covered

    def _run(self, fill) -> None:
        import xgrammar as xgr
        matchers = [s.grammar for s in self.seqs]
        if matchers:
            self.accepted = xgr.BatchGrammarMatcher.batch_accept_token(matchers, self.tokens)
        self.terminated = [m.is_terminated() for m in matchers]
        done = {id(s) for s, ok, term in zip(self.seqs, self.accepted, self.terminated) if term or not ok}
        rows = []
        for r in self.rows:
            if id(self.fill_seqs[r]) in done:
                self.host[r].fill_(-1)
            else:
                rows.append(r)
        t0 = time.perf_counter()
        if rows:
            fill([self.fill_seqs[r].grammar for r in rows], self.host, rows)
        self.fill_us = (time.perf_counter() - t0) * 1e6

    def wait(self) -> list[tuple[object, int, bool, bool]]:
        """Block until done; (sequence, token, accepted, terminated) per advanced sequence.
        Raises what the grammar thread raised."""
        try:
            self._future.result()
        finally:
            if not self._joined:
                self._joined = True
                sys.setswitchinterval(self._switch)
        return list(zip(self.seqs, self.tokens, self.accepted, self.terminated))
