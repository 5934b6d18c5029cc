"""Deferred sampling's grammar work, on a thread beside the engine's host work.

With overlap scheduling, step N's mask needs step N-1's tokens, which reach the host only
while step N's forward runs. The engine then (``LLMEngine._step_deferred``) starts one
:class:`GrammarStepJob` — advance the matchers by N-1's tokens, then fill N's rows — and
meanwhile processes N-1, schedules N+1 and stages its inputs; only N's sampler waits for it::

    engine thread:  collect N-1 │ process N-1 │ schedule N+1 │ stage N+1 │ join │ sample N │ run N+1
    grammar thread:             │ accept N-1's tokens │ fill N's rows ──────┘
    device:         ─────────── forward N ──────────────────────────────────────┤ sample N │ forward N+1

The advance runs first, on the engine thread (``batch_accept_token`` holds the GIL: on a
thread it only takes turns with the engine, measured on 2 cores), then the fill on the thread:
xgrammar's fill calls release the GIL. After each such call the thread must win the GIL back
from an engine thread that is running Python, and CPython hands it over only every
``sys.getswitchinterval()`` (5 ms by default), which starved such a thread in session 9
(measured on 2 cores: 93 fills in 0.5 s beside a Python loop vs 1,875 alone; 1,091 at a
0.1 ms interval). So the interval is lowered to ``SWITCH_INTERVAL_S`` while a job runs.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

SWITCH_INTERVAL_S = float(os.environ.get("MINIINFER_SWITCH_INTERVAL_S", "5e-5"))


class GrammarStepJob:
    """Advance ``accept`` (pairs of a sequence and its committed token) through their
    matchers at once, on the calling thread (xgrammar's ``batch_accept_token`` holds the GIL,
    so a thread would only take turns with the caller); then, on ``pool``'s thread, fill
    ``host[rows[j]]`` from ``fill_seqs[j]``'s matcher for each j whose matcher neither
    rejected its token nor terminated. ``fill`` is ``fill(matchers, host, rows)``. The
    matchers of ``fill_seqs`` must not move until ``rows()`` returned."""

    def __init__(self, pool: ThreadPoolExecutor, fill, accept: list[tuple[object, int]],
                 fill_seqs: list, rows: list[int], host: torch.Tensor):
        import xgrammar as xgr
        self._accept = accept
        self._owned = {id(seq) for seq, _ in accept}
        self._ok: list[bool] = []
        self._terminated: list[bool] = []
        if accept:
            matchers = [seq.grammar for seq, _ in accept]
            self._ok = xgr.BatchGrammarMatcher.batch_accept_token(matchers, [t for _, t in accept])
            self._terminated = [m.is_terminated() for m in matchers]
        done = {id(seq) for (seq, _), ok, end in zip(accept, self._ok, self._terminated) if not ok or end}
        live = [(seq.grammar, r) for seq, r in zip(fill_seqs, rows) if id(seq) not in done]
        self.rows_filled = [r for _, r in live]
        self.fill_us = 0.0  # the fill's time on the job's thread, µs
        self.host = host
        self._previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._future: Future = pool.submit(self._fill, fill, [m for m, _ in live])

    def _fill(self, fill, matchers: list) -> None:
        t0 = time.perf_counter()
        if matchers:
            fill(matchers, self.host, self.rows_filled)
        self.fill_us = (time.perf_counter() - t0) * 1e6

    def advances(self, seq) -> bool:
        """Whether this job moved ``seq``'s matcher (the caller must not)."""
        return id(seq) in self._owned

    def outcomes(self) -> list[tuple[object, int, bool, bool]]:
        """(sequence, token, accepted, terminated) for each advanced sequence."""
        return [(seq, t, ok, end) for (seq, t), ok, end in zip(self._accept, self._ok, self._terminated)]

    def rows(self) -> list[int]:
        """The rows filled (every row whose matcher is still live); waits for the fill and
        restores the switch interval. Raises the thread's error."""
        try:
            self._future.result()
            return self.rows_filled
        finally:
            sys.setswitchinterval(self._previous_interval)
