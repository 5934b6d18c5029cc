"""Logits processors: per-row rewrites of the raw logits before temperature and filtering.

Each processor looks at the batch once per step (``prepare``: ``None`` when no row needs it,
so the common batch pays nothing) and rewrites the ``[B, V]`` float32 logits on the device
(``apply``). They run in the order of ``LOGITS_PROCESSORS``:

1. ``logit_bias``: add the request's per-token bias (OpenAI / vLLM ``logit_bias``);
2. ``min_tokens``: EOS and ``stop_token_ids`` may not be sampled before ``min_tokens``;
3. ``penalties``: repetition (CTRL, Keskar et al. 2019: divide positive / multiply negative
   logits of seen tokens), presence and frequency (OpenAI's definition) penalties.

A grammar bitmask (structured output) is the next one; it is applied last, so no bias or
penalty can make a forbidden token allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from miniinfer.engine.sequence import Sequence

ToDevice = Callable[[list, torch.dtype], torch.Tensor]


@dataclass
class BatchView:
    """What a processor may read to prepare a step: the sampling sequences in row order."""
    seqs: list[Sequence]
    params: list  # [s.params for s in seqs]
    vocab_size: int
    device: torch.device
    eos_token_ids: tuple[int, ...]
    to_device: ToDevice  # host list -> device tensor without a sync (pinned staging on CUDA)


class LogitsProcessor(Protocol):
    name: str

    def prepare(self, batch: BatchView) -> object | None: ...

    def apply(self, logits: torch.Tensor, state: object) -> torch.Tensor: ...


@dataclass
class SparseEntries:
    """(row, token, value) triples: [K] int64 rows, [K] int64 tokens, [K] float32 values."""
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor | None = None


class LogitBias:
    name = "logit_bias"

    def prepare(self, batch: BatchView) -> SparseEntries | None:
        biased = [(i, p.logit_bias) for i, p in enumerate(batch.params) if p.logit_bias]
        if not biased:
            return None
        rows, cols, vals = [], [], []
        for i, bias_of in biased:
            for token, bias in bias_of.items():
                rows.append(i)
                cols.append(token)
                vals.append(bias)
        return SparseEntries(batch.to_device(rows, torch.int64), batch.to_device(cols, torch.int64),
                             batch.to_device(vals, torch.float32))

    def apply(self, logits: torch.Tensor, state: SparseEntries) -> torch.Tensor:
        return logits.index_put((state.rows, state.cols), state.values, accumulate=True)


class MinTokens:
    name = "min_tokens"

    def prepare(self, batch: BatchView) -> SparseEntries | None:
        if not any(p.min_tokens for p in batch.params):
            return None
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(batch.seqs):
            p = s.params
            if p.min_tokens and s.num_output_tokens + s.num_pending < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(batch.eos_token_ids))
                banned = sorted(t for t in banned if 0 <= t < batch.vocab_size)
                rows += [i] * len(banned)
                cols += banned
        if not rows:
            return None
        return SparseEntries(batch.to_device(rows, torch.int64), batch.to_device(cols, torch.int64))

    def apply(self, logits: torch.Tensor, state: SparseEntries) -> torch.Tensor:
        return logits.index_put((state.rows, state.cols), torch.full((), float("-inf"), device=logits.device))


@dataclass
class PenaltyState:
    repetition_penalty: torch.Tensor  # [B] float32 (1.0: none)
    presence_penalty: torch.Tensor  # [B]
    frequency_penalty: torch.Tensor  # [B]
    prompt_mask: torch.Tensor  # [B, V] bool: the token occurs in the prompt
    output_counts: torch.Tensor  # [B, V] float32: how often it was generated


class Penalties:
    """Needs every generated token on the host: requests using it force synchronous steps."""
    name = "penalties"

    def prepare(self, batch: BatchView) -> PenaltyState | None:
        params = batch.params
        if not any(p.needs_penalties for p in params):
            return None
        f32 = dict(dtype=torch.float32, device=batch.device)
        b, vocab = len(params), batch.vocab_size
        counts = torch.zeros(b, vocab, **f32)
        prompt_mask = torch.zeros(b, vocab, dtype=torch.bool, device=batch.device)
        for i, s in enumerate(batch.seqs):
            if not s.params.needs_penalties:
                continue
            out = torch.tensor(s.output_token_ids, dtype=torch.int64, device=batch.device)
            if out.numel():
                counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
            prompt = torch.tensor(s.token_ids[:s.num_prompt_tokens], dtype=torch.int64, device=batch.device)
            prompt_mask[i, prompt] = True
        return PenaltyState(torch.tensor([p.repetition_penalty for p in params], **f32),
                            torch.tensor([p.presence_penalty for p in params], **f32),
                            torch.tensor([p.frequency_penalty for p in params], **f32), prompt_mask, counts)

    def apply(self, logits: torch.Tensor, state: PenaltyState) -> torch.Tensor:
        return apply_penalties(logits, state)


def apply_penalties(logits: torch.Tensor, st: PenaltyState) -> torch.Tensor:
    seen = st.prompt_mask | (st.output_counts > 0)
    rep = st.repetition_penalty[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - st.frequency_penalty[:, None] * st.output_counts
    logits = logits - st.presence_penalty[:, None] * (st.output_counts > 0).float()
    return logits


LOGITS_PROCESSORS: tuple[LogitsProcessor, ...] = (LogitBias(), MinTokens(), Penalties())
