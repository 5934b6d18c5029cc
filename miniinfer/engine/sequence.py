"""A sequence: one choice of one request, from prompt to finish."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from miniinfer.outputs import Logprob
from miniinfer.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token not yet copied back from the device


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n choices
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens not computed for it at first admission: prefix-cache
    # hits and pages shared from another prefill chunk of the same step (Scheduler._borrow)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # why it failed (finish_reason "error")
    output_text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    generator: torch.Generator | None = None  # per-request seeded RNG
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finished_time: float | None = None
    detokenizer: object | None = None
    stop_checker: object | None = None
    grammar: object | None = None  # an xgrammar GrammarMatcher (structured output), advanced per committed token
    # reasoning models: the end marker's token ids while the thinking runs (the grammar sleeps
    # until the output ends with them); None once it ended or without a reasoning parser
    reasoning_end: list[int] | None = None
    num_preemptions: int = 0
    spec_token_ids: list[int] = field(default_factory=list)  # drafts proposed for the next step
    spec_parents: list[int] | None = None  # their tree (ScheduledSeq.draft_parents), None: a chain
    spec_state: object | None = None  # the drafter's per-sequence state (e.g. its cache's valid length)
    num_draft_tokens: int = 0  # drafts verified for this sequence ...
    num_accepted_tokens: int = 0  # ... and how many of them the target accepted
    spec_draft_time_s: float = 0.0  # this sequence's share of the drafting and verify steps' wall time
    spec_verify_time_s: float = 0.0
    prefix_cursor: object | None = None  # KVCacheManager.insert's resume point
    # Overlap scheduling: tokens sampled by a step still running on the device sit at the end
    # of token_ids as PLACEHOLDER until that step is processed; pending_row is the row of the
    # newest one in its step's sampled-ids tensor.
    num_pending: int = 0
    pending_row: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens known on the host (pending ones excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    def add_pending(self, row: int) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1
        self.pending_row = row

    def resolve_pending(self, token: int) -> None:
        """The oldest pending token became known."""
        self.token_ids[len(self.token_ids) - self.num_pending] = token
        self.num_pending -= 1

    def drop_pending(self) -> None:
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def grammar_active(self) -> bool:
        """Whether the next token is constrained by the grammar."""
        return self.grammar is not None and self.reasoning_end is None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(req={self.request_id}#{self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
