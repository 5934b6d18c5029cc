"""The per-step contract between the scheduler and the model runner.

The scheduler produces a :class:`SchedulerOutput`; the runner (``worker/``) turns it into
device work and hands back an :class:`InFlightStep`, later a :class:`StepResult`. Both sides
import this module and neither imports the other.

    Scheduler.schedule() ─▶ SchedulerOutput ─▶ ModelRunner.forward() ─▶ ForwardOutput
        ─▶ ModelRunner.sample() ─▶ InFlightStep ─▶ ModelRunner.collect() ─▶ StepResult
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from miniinfer.engine.sequence import Sequence

if TYPE_CHECKING:
    from miniinfer.sample.sampler import SamplerOutput


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: ``num_new_tokens`` tokens from position ``start``."""
    seq: Sequence
    num_new_tokens: int
    start: int  # position of the first new token (== num_computed_tokens before the step)
    # speculative decoding: draft tokens verified in this step, after the sequence's last token
    # (they count in num_new_tokens but are not in seq.token_ids)
    draft_token_ids: list[int] = field(default_factory=list)
    # a draft tree (EAGLE-2): the parent of each draft, an index into draft_token_ids or -1 for
    # the sequence's last token; parents come before children. None: a chain (parent = j - 1)
    draft_parents: list[int] | None = None
    # tokens before ``start`` whose pages another sequence's prefill chunk computes in this same
    # step (shared at admission; the forward stores every token's K/V before any attention)
    num_borrowed_tokens: int = 0
    samples: bool = field(init=False)  # the step reaches the end of the tokens: sample one more

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes (1 token) first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def has_constrained_sampler(self) -> bool:
        """Whether a sequence with a grammar samples in the step (a dormant one too: the
        previous step's token may wake it)."""
        return any(s.samples and s.seq.grammar is not None for s in self.scheduled)

    def rollback(self) -> None:
        """A step that failed to queue may not have written its K/V: roll the progress back so
        that an abort (which publishes computed pages) can't put unwritten pages in the cache
        (pages shared from another chunk of this step included)."""
        for s in self.scheduled:
            s.seq.num_computed_tokens = s.start - s.num_borrowed_tokens

    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ForwardOutput:
    """A step whose forward is queued on the device; its logits are not sampled yet.

    Between ``ModelRunner.forward`` and ``ModelRunner.sample`` the host may work on the
    previous step (and, next, fill a grammar bitmask for these rows)."""
    sched: SchedulerOutput
    sampling_seqs: list[Sequence]  # the sequences that sample, in row order of ``logits``
    logits: torch.Tensor | None  # [rows, V] float32 on the device; None: nobody samples
    # speculative verify: the logits rows of each sampling sequence (1 + its drafts); None:
    # one row per sampling sequence
    seq_rows: list[range] | None = None
    # EAGLE: the final hidden states of every input token [T, H] (a CUDA graph's are static:
    # valid until its next replay), when the runner keeps them
    hidden: torch.Tensor | None = None


@dataclass
class InFlightStep:
    """A step launched on the device whose sampled ids haven't been read on the host yet."""
    sched: SchedulerOutput
    sampling_seqs: list[Sequence]
    token_ids: torch.Tensor | None  # [n] int64 on the device
    token_ids_host: torch.Tensor | None  # pinned copy, valid once ``event`` has completed
    event: "torch.cuda.Event | None"
    sampler_output: "SamplerOutput | None"  # kept (device tensors) when some row wants logprobs
    num_tokens: torch.Tensor | None = None  # speculative verify: [B] committed tokens per sequence
    paths: torch.Tensor | None = None  # speculative verify: [B, W] the accepted path (StepResult.spec_paths)
    seq_rows: list[range] | None = None  # speculative verify: ForwardOutput.seq_rows
    hidden: torch.Tensor | None = None  # ForwardOutput.hidden
    # speculative verify walked on the host: (draft tokens, parents) per sequence; token_ids
    # then holds every row's draw (rejection_sampler.accept_paths)
    spec_trees: tuple[list[list[int]], list[list[int]]] | None = None
    launched_at: float | None = None  # time.perf_counter() when the engine launched it (speculation's metrics)
    # a step launched outside the runner's forward/sample (the fused EAGLE step): its collect
    collect_with: "Callable[[InFlightStep], StepResult] | None" = None


@dataclass
class StepResult:
    """Host-side results of one step, for the sequences that sampled (in scheduled order)."""
    token_ids: list[int]  # each sampling sequence's (first) new token
    sampler_output: "SamplerOutput | None"  # device tensors, kept for logprobs
    # speculative verify: each sampling sequence's committed tokens (accepted drafts, then the
    # recovered or bonus token) and the sampler_output row of the first of them
    spec_token_ids: list[list[int]] | None = None
    logits_rows: list[int] | None = None
    # speculative verify: per sampling sequence, the offsets among its verified tokens (0 = its
    # last token, j = draft j - 1) of the accepted path: [0, ...] one per committed token
    spec_paths: list[list[int]] | None = None
    hidden: torch.Tensor | None = None  # ForwardOutput.hidden
