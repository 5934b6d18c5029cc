"""Deferred sampling's grammar work, on a thread beside the engine's host work.

With overlap scheduling, step N's mask needs step N-1's tokens, which reach the host only
while step N's forward runs. The engine then (``engine/deferred_sampling.py``) starts one
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
import threading
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
    matchers of ``fill_seqs`` must not move until ``rows()`` returned; ``rows()`` is called
    exactly once (it restores the switch interval)."""

    def __init__(self, pool: ThreadPoolExecutor, fill, accept: list[tuple[object, int]],
                 fill_seqs: list, rows: list[int], host: torch.Tensor):
        import xgrammar as xgr
        self._outcomes: dict[int, tuple[bool, bool]] = {}  # id(seq) -> (accepted, terminated)
        if accept:
            matchers = [seq.grammar for seq, _ in accept]
            ok = xgr.BatchGrammarMatcher.batch_accept_token(matchers, [t for _, t in accept])
            self._outcomes = {id(seq): (a, m.is_terminated()) for (seq, _), a, m in zip(accept, ok, matchers)}
        live = [(seq.grammar, r) for seq, r in zip(fill_seqs, rows)
                if self._outcomes.get(id(seq), (True, False)) == (True, False)]
        self.rows_filled = [r for _, r in live]
        self.fill_us = 0.0  # the fill's time on the job's thread, µs
        self.host = host
        _lower_switch_interval()
        try:
            self._future: Future = pool.submit(self._fill, fill, [m for m, _ in live])
        except BaseException:
            _restore_switch_interval()
            raise

    def _fill(self, fill, matchers: list) -> None:
        t0 = time.perf_counter()
        if matchers:
            fill(matchers, self.host, self.rows_filled)
        self.fill_us = (time.perf_counter() - t0) * 1e6

    def outcome(self, seq) -> tuple[bool, bool] | None:
        """(accepted, terminated) if this job advanced ``seq``'s matcher, else None."""
        return self._outcomes.get(id(seq))

    def rows(self) -> list[int]:
        """The rows filled (every row whose matcher is still live); waits for the fill and
        restores the switch interval. Raises the thread's error."""
        if self._future is None:
            raise RuntimeError("GrammarStepJob.rows() called twice")
        try:
            self._future.result()
            return self.rows_filled
        finally:
            self._future = None
            _restore_switch_interval()


_lock = threading.Lock()
_running = 0  # jobs between start and join, over every engine of the process
_saved_interval = 0.0


def _lower_switch_interval() -> None:
    global _running, _saved_interval
    with _lock:
        if _running == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        _running += 1


def _restore_switch_interval() -> None:
    global _running
    with _lock:
        _running -= 1
        if _running == 0:
            sys.setswitchinterval(_saved_interval)
