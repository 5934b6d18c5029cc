"""Deferred sampling: a constrained step samples after the next step is scheduled and staged.

With overlap scheduling, step N's grammar mask needs step N-1's tokens, which reach the host
only while N's forward runs; filling it on the engine thread puts the fill on the critical
path of a host-bound step. Here N's forward is queued alone (``LLMEngine._pending``); the next
``step()`` collects N-1, advances the matchers, lets the grammar thread fill N's mask
(``structured_output/step_job.py``) while N-1 is processed and N+1 scheduled and staged, then
samples N and queues N+1's forward. docs/ARCHITECTURE.md section 11 has the timeline.

``DeferredSampling`` is a part of ``LLMEngine`` (a mixin): it uses the engine's ``runner``,
``scheduler``, ``inflight``, ``_structured``, ``proposer``, ``_num_sync_requests`` and its
``_process`` / ``_complete`` / ``_launched``.
"""
from __future__ import annotations

import os

from miniinfer.config import EngineConfig
from miniinfer.engine.step import ForwardOutput
from miniinfer.outputs import RequestOutput

# Deferred sampling needs this many constrained rows in a step: below it the grammar thread's
# hand-off costs more than the fill it moves (H200 host, Qwen2-0.5B, batch 1: TPOT 0.97 ms
# deferred vs 0.75 ms not; MINIINFER_DEFER_MIN_ROWS overrides it).
DEFER_MIN_ROWS = int(os.environ.get("MINIINFER_DEFER_MIN_ROWS", "8"))


class DeferredSampling:
    def _init_deferred_sampling(self, config: EngineConfig) -> None:
        self._pending: ForwardOutput | None = None  # forward queued, not sampled yet
        # EngineConfig.deferred_sampling (MINIINFER_DEFERRED_SAMPLING=0 turns it off); may be
        # switched between steps (benchmarks' A/B)
        self.deferred_sampling = (config.deferred_sampling and config.overlap_scheduling
                                  and os.environ.get("MINIINFER_DEFERRED_SAMPLING", "1") != "0")
        self.defer_min_rows = DEFER_MIN_ROWS
        self.num_deferred_steps = 0  # constrained steps whose sampling was deferred (their forward queued alone)

    def _defers(self, sched) -> bool:
        """Whether step N's sampling waits for the next ``step()``: ``defer_min_rows``
        constrained sequences sample in it, none is waiting for its reasoning to end (its mask
        would depend on N-1's tokens in a way the grammar thread doesn't follow), and nothing
        needs the synchronous path (speculation, penalties, tensor parallelism) or the serial
        mask (``structured_output_overlap`` off: the A/B baseline fills after the forward)."""
        if (not self.deferred_sampling or self._structured is None or not self._structured.overlap
                or self.proposer is not None
                or self._num_sync_requests or self.runner.tp.enabled):
            return False
        constrained = 0
        for s in sched.scheduled:
            if s.samples and s.seq.grammar is not None:
                if s.seq.reasoning_end is not None:
                    return False
                constrained += 1
        return constrained >= max(self.defer_min_rows, 1)

    def _start_deferred(self, sched) -> None:
        """Queue step N's forward alone; the next ``step()`` samples it (``_step_deferred``)."""
        try:
            self._pending = self.runner.forward(sched, self.inflight)
        except BaseException:
            sched.rollback()
            raise
        self._launched(sched, self._pending.sampling_seqs)
        self.num_deferred_steps += 1

    def _step_deferred(self) -> list[RequestOutput]:
        """Step N's forward is queued, unsampled; step N-1 (if any) is sampled, uncollected.
        Collect N-1 and advance the matchers by its tokens; fill N's mask on the grammar
        thread while N-1 is processed, N+1 scheduled and its inputs staged; then sample N and
        queue N+1's forward (deferred again, or sampled at once and N completed). A fault
        before N+1's forward is queued rolls N+1's progress back (as ``_launch`` does)::

            host:    collect N-1 │ accept N-1 │ process N-1 │ schedule N+1 │ stage N+1 │ sample N │ run N+1
            grammar:                          │ fill N ────────────────────────────────┘
            device:  ────────── forward N ───────────────────────────────────────────────┤ sample N │ forward N+1
        """
        fwd, self._pending = self._pending, None
        prev, self.inflight = self.inflight, None
        outputs: list[RequestOutput] = []
        result = self.runner.collect(prev) if prev is not None else None
        accept = []
        if prev is not None:
            rows = [s.seq for s in prev.sched.scheduled if s.samples]
            accept = [(seq, t) for seq, t in zip(rows, result.token_ids) if seq.grammar_active and not seq.is_finished]
        job = self._structured.start_step(accept, fwd.sampling_seqs)
        sched = prepared = following = None
        try:  # until N+1's forward is queued, a fault rolls its scheduled progress back
            try:
                if prev is not None:
                    outputs += self._process(prev, result, job)
                sched = self.scheduler.schedule()
                if not sched.is_empty():
                    prepared = self.runner.prepare_forward(sched)
            finally:
                bitmask = self._structured.finish_step(job)
            launched = self.runner.sample(fwd, bitmask)
            self.inflight = launched
            if prepared is not None:
                following = self.runner.run_forward(prepared, launched)
        except BaseException:
            if sched is not None:
                sched.rollback()
            raise
        if following is None:
            return outputs
        self._launched(sched, following.sampling_seqs)
        if self._defers(sched):
            self._pending = following
            self.num_deferred_steps += 1
            return outputs
        if sched.has_constrained_sampler:  # its mask needs N's tokens in the matchers first (as in _launch)
            self.inflight = None  # N is completed here: never again by on_idle, should this raise
            outputs += self._complete(launched)
            self.inflight = self.runner.sample(following)
        else:
            self.inflight = self.runner.sample(following)
            outputs += self._complete(launched)
        return outputs
