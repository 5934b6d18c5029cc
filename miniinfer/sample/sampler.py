"""Batched sampling on the logits' device: logits processors, temperature, top-k / top-p /
min-p, per-request seeds, and top-N logprobs of the raw logits. No per-row host syncs: the
runner copies the sampled ids to the host once per step.

Two noise sources, one rule (a row's draw depends on its own seed only):

- CUDA: the fused Triton kernel (``kernels/sampling.py``) adds Gumbel noise from Philox keyed by
  a per-row seed to logits / T and takes the argmax in one pass over the logits (the
  Gumbel-max trick; no softmax).
- elsewhere: exponential-race sampling, argmax(p / E) with E ~ Exp(1) drawn from the row's own
  ``torch.Generator`` (same distribution; the two devices draw different streams).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.sample.metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # For rows that asked for logprobs (else None): the sampled token's logprob and rank, and
    # the top-N ids and logprobs (N = the batch's largest request), all of the raw logits.
    sampled_logprob: torch.Tensor | None = None  # [B] float32
    sampled_rank: torch.Tensor | None = None  # [B] int64, 1 = most likely
    top_ids: torch.Tensor | None = None  # [B, N] int64
    top_logprobs: torch.Tensor | None = None  # [B, N] float32


def apply_top_k_top_p_min_p(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Mask (-inf) what top-k, top-p (nucleus; Holtzman et al. 2020) and min-p drop; [B, V]."""
    if md.top_k is None and md.top_p is None and md.min_p is None:
        return logits
    if md.min_p is not None:
        probs = logits.softmax(-1)
        thresh = probs.amax(-1, keepdim=True) * md.min_p[:, None]
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    if md.top_k is None and md.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if md.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        remove |= ranks >= md.top_k[:, None]
    if md.top_p is not None:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        before = probs.cumsum(-1) - probs
        remove |= before >= md.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, md: SamplingMetadata,
           generator: torch.Generator | None = None) -> SamplerOutput:
    """logits: [B, V] float32, raw from the LM head. Returns the sampled ids [B] (and logprobs).
    ``generator``: the noise of unseeded rows on the non-fused path (the engine's own RNG)."""
    out = SamplerOutput(token_ids=torch.empty(0))
    if md.grammar_bitmask is not None:  # first: logprobs then describe the masked distribution
        logits = md.grammar_bitmask.apply(logits)
    if md.want_logprobs:
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(md.max_logprobs, dim=-1)
        out.top_logprobs, out.top_ids = top.values, top.indices
    for processor, state in md.processors:
        logits = processor.apply(logits, state)
    if md.processors:  # a penalty or bias may overflow a finite logit: keep +inf out (bans stay -inf)
        logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    out.token_ids = _draw(logits, md, generator)
    if md.want_logprobs:
        chosen = logprobs.gather(-1, out.token_ids[:, None])
        out.sampled_logprob = chosen.squeeze(-1)
        out.sampled_rank = (logprobs > chosen).sum(-1) + 1
    return out


def scaled_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """(logits − row max) / T, then top-k / top-p / min-p: [B, V], each row's best entry 0, the
    rest finite or −inf, so its softmax is never NaN for finite (or −inf) logits and any
    accepted temperature (T ≥ GREEDY_TEMPERATURE; the shift doesn't change the distribution)."""
    shifted = logits - logits.amax(-1, keepdim=True)
    return apply_top_k_top_p_min_p(shifted / md.temperature[:, None], md)


def _draw(logits: torch.Tensor, md: SamplingMetadata, generator: torch.Generator | None) -> torch.Tensor:
    if md.all_greedy:
        return logits.argmax(-1)
    if md.seeds is not None:
        from miniinfer.kernels.sampling import fused_sample
        if md.top_k is None and md.top_p is None and md.min_p is None:
            return fused_sample(logits, torch.where(md.greedy, 0.0, md.temperature), md.seeds)
        # filter logits / T, then the same noise and argmax (greedy rows: T = 1, no noise)
        return fused_sample(scaled_logits(logits, md), (~md.greedy).float(), md.seeds)
    greedy_ids = logits.argmax(-1)
    probs = scaled_logits(logits, md).softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, g in enumerate(md.generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(-1)
    return torch.where(md.greedy, greedy_ids, sampled)
