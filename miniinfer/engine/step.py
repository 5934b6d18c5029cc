"""The per-step contract between the scheduler and the model runner.

The scheduler produces a :class:`SchedulerOutput`; the runner (``worker/``) turns it into
device work and hands back an :class:`InFlightStep`, later a :class:`StepResult`. Both sides
import this module and neither imports the other.

    Scheduler.schedule() ─▶ SchedulerOutput ─▶ ModelRunner.forward() ─▶ ForwardOutput
        ─▶ ModelRunner.sample() ─▶ InFlightStep ─▶ ModelRunner.collect() ─▶ StepResult
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    samples: bool = field(init=False)  # the step reaches the end of the tokens: sample one more

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes (1 token) first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ForwardOutput:
    """A step whose forward is queued on the device; its logits are not sampled yet.

    Between ``ModelRunner.forward`` and ``ModelRunner.sample`` the host may work on the
    previous step (and, next, fill a grammar bitmask for these rows)."""
    sched: SchedulerOutput
    sampling_seqs: list[Sequence]  # the sequences that sample, in row order of ``logits``
    logits: torch.Tensor | None  # [len(sampling_seqs), V] float32 on the device; None: nobody samples


@dataclass
class InFlightStep:
    """A step launched on the device whose sampled ids haven't been read on the host yet."""
    sched: SchedulerOutput
    sampling_seqs: list[Sequence]
    token_ids: torch.Tensor | None  # [n] int64 on the device
    token_ids_host: torch.Tensor | None  # pinned copy, valid once ``event`` has completed
    event: "torch.cuda.Event | None"
    sampler_output: "SamplerOutput | None"  # kept (device tensors) when some row wants logprobs


@dataclass
class StepResult:
    """Host-side results of one step, for the sequences that sampled (in scheduled order)."""
    token_ids: list[int]
    sampler_output: "SamplerOutput | None"  # device tensors, kept for logprobs
