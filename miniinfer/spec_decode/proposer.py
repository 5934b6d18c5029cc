"""The drafting side of speculative decoding, shared by every method: which running
sequences draft this step, how many tokens each may, and the acceptance statistics.

    engine.step():  proposer.propose_for(running) ─▶ seq.spec_token_ids
                    Scheduler: a decode + its drafts as one (1 + k)-token verify
                    ModelRunner: rejection sampler ─▶ committed tokens ─▶ proposer.record
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.spec_decode.config import SpeculativeConfig


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # sequences × verify steps that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_draft_steps: int = 0  # engine steps that drafted, and their wall time (s) ...
    draft_time_s: float = 0.0
    num_verify_steps: int = 0  # ... steps that verified drafts: launch to committed tokens (s)
    verify_time_s: float = 0.0

    def as_dict(self) -> dict:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        mean = 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens, "spec_acceptance_rate": rate,
                "spec_mean_accepted_len": mean,
                "spec_draft_time_s": self.draft_time_s, "spec_verify_time_s": self.verify_time_s,
                "spec_draft_ms_per_step": 1e3 * self.draft_time_s / self.num_draft_steps if self.num_draft_steps else 0.0,
                "spec_verify_ms_per_step": 1e3 * self.verify_time_s / self.num_verify_steps if self.num_verify_steps else 0.0}


class Proposer:
    """Base class: subclasses implement ``draft(seqs, ks)`` → one token list per sequence (a
    drafter of trees also sets each sequence's ``spec_parents``)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.stats_ = SpecDecodeStats()

    def draft(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def propose_for(self, running: list[Sequence]) -> None:
        """Set ``spec_token_ids`` of the running sequences that may draft this step."""
        limit = self.config.disable_by_batch_size
        if limit is not None and len(running) > limit:
            return
        seqs, ks = [], []
        for seq in running:
            k = self.budget(seq)
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        if seqs:
            t0 = time.perf_counter()
            for seq in seqs:
                seq.spec_parents = None  # a chain unless the drafter grows a tree
            for seq, tokens in zip(seqs, self.draft(seqs, ks)):
                seq.spec_token_ids = tokens
            self.count_draft_step(seqs, time.perf_counter() - t0)  # the drafter's host work and its device reads

    def count_draft_step(self, seqs: list[Sequence], dt: float) -> None:
        """A drafting step of ``dt`` seconds for ``seqs``: each gets its share."""
        self.stats_.num_draft_steps += 1
        self.stats_.draft_time_s += dt
        for seq in seqs:
            seq.spec_draft_time_s += dt / len(seqs)

    def claim(self, sched: SchedulerOutput) -> bool:
        """Whether the drafter runs the scheduled step itself (``launch``): EAGLE's fused
        step. False here."""
        return False

    def launch(self, sched: SchedulerOutput):
        raise NotImplementedError

    def run_ahead(self, prev):
        """Overlap scheduling: queue the step after ``prev`` (in flight, not processed) and
        return the call that completes its launch once ``prev`` is processed, or None (every
        drafter but EAGLE's fused step: verify steps are synchronous, drafts need the last token)."""
        return None

    def budget(self, seq: Sequence) -> int:
        """How many drafts ``seq`` may carry: 0 unless it is decoding with every token known
        and its sampling needs nothing per position that the verify lacks (penalties,
        min_tokens not yet reached, a grammar still dormant: it would wake mid-draft, its
        masks unfilled); never past max_tokens or max_model_len. A grammar that constrains gets
        one mask row per draft (``StructuredOutputManager.fill_verify_bitmask``)."""
        p = seq.params
        dormant = seq.grammar is not None and not seq.grammar_active
        if (seq.is_finished or seq.num_pending or seq.num_computed_tokens != seq.num_tokens - 1
                or p.needs_penalties or dormant or seq.num_output_tokens < p.min_tokens):
            return 0
        k = min(self.config.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - seq.num_output_tokens - 1)
        return max(k, 0)

    def record(self, sched: SchedulerOutput, result: StepResult, verify_time_s: float | None = None) -> None:
        """Count a verify step's drafts and accepted tokens (called after every step);
        ``verify_time_s``: the step's wall time from launch to its committed tokens, shared
        among the sequences that verified drafts."""
        with_drafts = [(s, tokens) for s, tokens in verified(sched, result) if s.draft_token_ids]
        for s, tokens in with_drafts:
            self.stats_.num_drafts += 1
            self.stats_.num_draft_tokens += len(s.draft_token_ids)
            self.stats_.num_accepted_tokens += len(tokens) - 1
            s.seq.num_draft_tokens += len(s.draft_token_ids)
            s.seq.num_accepted_tokens += len(tokens) - 1
            if verify_time_s is not None:
                s.seq.spec_verify_time_s += verify_time_s / len(with_drafts)
        if with_drafts and verify_time_s is not None:
            self.stats_.num_verify_steps += 1
            self.stats_.verify_time_s += verify_time_s

    def stats(self) -> dict:
        return self.stats_.as_dict()


def verified(sched: SchedulerOutput, result: StepResult) -> Iterator[tuple[ScheduledSeq, list[int]]]:
    """(scheduled sequence, its committed tokens) for every sequence that sampled in a verify
    step (speculation's steps; nothing for a step without ``spec_token_ids``)."""
    if result.spec_token_ids is None:
        return
    committed = iter(result.spec_token_ids)
    for s in sched.scheduled:
        if s.samples:
            yield s, next(committed)


class NgramDrafter(Proposer):
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        super().__init__(config, max_model_len)
        from miniinfer.spec_decode.ngram import NgramProposer
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, config.num_speculative_tokens)

    def draft(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self.ngram.propose(seq.token_ids, k) for seq, k in zip(seqs, ks)]
