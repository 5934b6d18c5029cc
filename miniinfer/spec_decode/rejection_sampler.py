"""Verify drafts against the target model: lossless speculative sampling.

A sequence with k draft tokens d_1..d_k has k + 1 logits rows (the target's distribution
p_j at each draft position, and the bonus row). Draft d_j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from the residual
norm(max(p_j − q_j, 0)); when all are accepted a bonus token is drawn from p_{k+1}. The output
is distributed exactly as the target's (Leviathan et al., "Fast Inference from Transformers via
Speculative Decoding", 2023; Chen et al., "Accelerating LLM Decoding with Speculative
Sampling", 2023). Our drafters are deterministic (n-gram lookup, greedy draft models), so q_j
is a point mass on d_j: accept with probability p_j(d_j), and the residual is p_j with d_j
removed. Greedy rows accept d_j iff it is p_j's argmax and otherwise emit the argmax, so
greedy output equals non-speculative greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.sample.metadata import SamplingMetadata
from miniinfer.sample.sampler import SamplerOutput, scaled_logits


@dataclass
class SpecSamplerOutput:
    token_ids: torch.Tensor  # [B, K + 1] int64: each sequence's committed tokens, then -1
    num_tokens: torch.Tensor  # [B] int64: accepted drafts + 1 (the recovered or bonus token)
    sampler_output: SamplerOutput | None  # logprobs of every row (row of committed token j of
    # sequence b = row_index[b, j]), when some row asked for them


def rejection_sample(logits: torch.Tensor, md: SamplingMetadata, draft_ids: torch.Tensor,
                     row_index: torch.Tensor, seq_rows: list[range],
                     seq_generators: list[torch.Generator | None],
                     generator: torch.Generator | None = None) -> SpecSamplerOutput:
    """``logits`` [R, V] float32 raw from the LM head, ``md`` over the same R rows (a
    sequence's parameters repeated on its rows); ``draft_ids`` [R] int64, the draft token each
    row verifies (-1 on a sequence's last row); ``row_index`` [B, K + 1] int64, the rows of
    sequence b in order (-1 padding), ``seq_rows`` the same on the host; ``seq_generators`` the per-sequence seeded RNGs (None:
    ``generator``, or the device's default RNG when that is None or on another device)."""
    if md.grammar_bitmask is not None:
        logits = md.grammar_bitmask.apply(logits)
    out = None
    if md.want_logprobs:
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(md.max_logprobs, dim=-1)
        out = SamplerOutput(torch.empty(0), top_logprobs=top.values, top_ids=top.indices)
    for processor, state in md.processors:
        logits = processor.apply(logits, state)
    if md.processors:
        logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    R = logits.shape[0]
    B, width = row_index.shape
    argmax = logits.argmax(-1)
    has_draft = draft_ids >= 0
    safe_draft = draft_ids.clamp(min=0)
    if md.all_greedy:
        probs = None
        accept = has_draft & (argmax == safe_draft)
    else:
        probs = scaled_logits(logits, md).softmax(-1)
        u = _uniform(R, seq_rows, seq_generators, generator, logits.device)
        p_draft = probs.gather(-1, safe_draft[:, None]).squeeze(-1)
        accept = has_draft & torch.where(md.greedy, argmax == safe_draft, u < p_draft)
    valid = row_index >= 0
    safe_index = row_index.clamp(min=0)
    acc = accept[safe_index] & valid  # [B, K + 1]
    num_accepted = acc.long().cumprod(-1).sum(-1)  # leading accepted drafts
    last_row = row_index.gather(1, num_accepted[:, None]).squeeze(1)  # where the new token comes from
    recovered = argmax[last_row]
    if probs is not None:
        residual = probs[last_row]
        d = safe_draft[last_row][:, None]  # a rejected draft leaves the residual; no draft: p itself
        residual.scatter_(-1, d, torch.where(has_draft[last_row][:, None], 0.0, residual.gather(-1, d)))
        noise = _exponential(residual, seq_generators, generator)
        sampled = (residual / noise).argmax(-1)
        recovered = torch.where(md.greedy[last_row], recovered, sampled)
    cols = torch.arange(width, device=logits.device)[None, :]
    drafts = torch.where(valid, draft_ids[safe_index], -1)
    # column j < m: the j-th accepted draft (row j verified it); column m: the new token
    tokens = torch.where(cols < num_accepted[:, None], drafts, -1)
    tokens = torch.where(cols == num_accepted[:, None], recovered[:, None], tokens)
    if out is not None:
        row_token = torch.zeros(R + 1, dtype=torch.int64, device=logits.device)  # row R: a sink
        row_token.scatter_(0, torch.where(tokens >= 0, row_index, R).view(-1), tokens.clamp(min=0).view(-1))
        row_token = row_token[:R]
        chosen = logprobs.gather(-1, row_token[:, None])
        out.sampled_logprob = chosen.squeeze(-1)
        out.sampled_rank = (logprobs > chosen).sum(-1) + 1
        out.token_ids = row_token
    return SpecSamplerOutput(tokens, num_accepted + 1, out)


def _uniform(R: int, seq_rows: list[range], gens: list, generator, device) -> torch.Tensor:
    u = torch.rand(R, device=device, generator=_usable(generator, device))
    for rows, g in zip(seq_rows, gens):
        if g is not None:
            u[rows.start:rows.stop] = torch.rand(len(rows), device=device, generator=g)
    return u


def _exponential(like: torch.Tensor, gens: list, generator) -> torch.Tensor:
    noise = torch.empty_like(like).exponential_(generator=_usable(generator, like.device))
    for b, g in enumerate(gens):
        if g is not None:
            noise[b].exponential_(generator=g)
    return noise


def _usable(generator, device) -> torch.Generator | None:
    return generator if generator is not None and generator.device == device else None
