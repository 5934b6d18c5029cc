"""Batched sampling on the logits' device: penalties, temperature, top-k / top-p / min-p,
per-request seeds, and top-N logprobs of the raw logits. No per-row host syncs: the caller
copies the sampled ids to the host once per step.

Two noise sources, one rule (a row's draw depends on its own seed only, so a seeded request
samples the same tokens whatever else is in the batch):

- CUDA: the fused Triton kernel (``kernels/sampling.py``) adds Gumbel noise from Philox keyed by
  a per-row seed, derived from the request's seed and the output position, to logits / T and
  takes the argmax in one pass over the logits (no softmax).
- elsewhere: exponential-race sampling, argmax(p / E) with E ~ Exp(1) drawn from the row's own
  ``torch.Generator`` (same distribution; the two devices draw different streams)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from miniinfer.engine.sequence import Sequence


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] (greedy rows hold 1.0; see greedy)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where unused
    top_p: torch.Tensor | None  # [B]
    min_p: torch.Tensor | None  # [B]
    repetition_penalty: torch.Tensor | None  # [B]
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    prompt_mask: torch.Tensor | None  # [B, V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None  # [B, V] counts of generated tokens
    generators: list[torch.Generator | None]
    all_greedy: bool
    want_logprobs: bool  # some row asked for logprobs
    max_logprobs: int  # the largest top-N asked for (may be 0: the sampled token's only)
    # (row, token) pairs that may not be sampled: EOS / stop tokens before min_tokens
    ban_rows: torch.Tensor | None = None
    ban_cols: torch.Tensor | None = None
    # CUDA only: per-row Philox seeds for the fused sampling kernel (see module doc)
    seeds: torch.Tensor | None = None

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device,
              eos_token_ids=(), to_device=None, rng: random.Random | None = None) -> "SamplingBatch":
        """``to_device(values, dtype)`` copies a host list to the device without a sync
        (the runner passes its pinned staging); default: a plain copy."""
        params = [s.params for s in seqs]
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i, s in enumerate(seqs):
            p = s.params
            if p.min_tokens and s.num_output_tokens + s.num_pending < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                banned = sorted(t for t in banned if 0 <= t < vocab_size)
                ban_rows += [i] * len(banned)
                ban_cols += banned
        f32 = dict(dtype=torch.float32, device=device)

        def dev(values, dtype):
            if to_device is not None:
                return to_device(values, dtype)
            return torch.tensor(values, dtype=dtype).to(device)

        greedy_list = [p.temperature == 0.0 for p in params]
        temperature = dev([1.0 if g else p.temperature for g, p in zip(greedy_list, params)], torch.float32)
        need_topk = any(p.top_k > 0 for p in params)
        need_topp = any(p.top_p < 1.0 for p in params)
        need_minp = any(p.min_p > 0.0 for p in params)
        need_pen = any(p.needs_penalties for p in params)
        prompt_mask = output_counts = rep = pres = freq = None
        if need_pen:
            rep = torch.tensor([p.repetition_penalty for p in params], **f32)
            pres = torch.tensor([p.presence_penalty for p in params], **f32)
            freq = torch.tensor([p.frequency_penalty for p in params], **f32)
            b = len(seqs)
            output_counts = torch.zeros(b, vocab_size, **f32)
            prompt_mask = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
            for i, s in enumerate(seqs):
                if not s.params.needs_penalties:
                    continue
                out = torch.tensor(s.output_token_ids, dtype=torch.int64, device=device)
                if out.numel():
                    output_counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
                prompt = torch.tensor(s.token_ids[:s.num_prompt_tokens], dtype=torch.int64, device=device)
                prompt_mask[i, prompt] = True
        lp = [p.logprobs for p in params]
        seeds = None
        if device.type == "cuda" and not all(greedy_list):
            rng = rng or random.Random()
            seeds = dev([_row_seed(p.seed + s.index, s.num_output_tokens + s.num_pending) if p.seed is not None
                         else rng.getrandbits(31) for p, s in zip(params, seqs)], torch.int64)
        return cls(
            temperature=temperature,
            greedy=dev(greedy_list, torch.bool),
            top_k=dev([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64) if need_topk else None,
            top_p=dev([p.top_p for p in params], torch.float32) if need_topp else None,
            min_p=dev([p.min_p for p in params], torch.float32) if need_minp else None,
            repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
            prompt_mask=prompt_mask, output_counts=output_counts,
            generators=[s.generator for s in seqs],
            all_greedy=all(greedy_list),
            want_logprobs=any(x is not None for x in lp),
            max_logprobs=max((x for x in lp if x is not None), default=0),
            ban_rows=dev(ban_rows, torch.int64) if ban_rows else None,
            ban_cols=dev(ban_cols, torch.int64) if ban_rows else None,
            seeds=seeds,
        )


_MASK64 = (1 << 64) - 1


def _row_seed(base: int, position: int) -> int:
    """A 31-bit Philox seed for (request seed + choice index, output position): splitmix64."""
    x = (base * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # For rows that asked for logprobs (else None): the sampled token's logprob and rank, and
    # the top-N ids and logprobs (N = the batch's largest request).
    sampled_logprob: torch.Tensor | None = None  # [B]
    sampled_rank: torch.Tensor | None = None  # [B]
    top_ids: torch.Tensor | None = None  # [B, N]
    top_logprobs: torch.Tensor | None = None  # [B, N]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    seen = b.prompt_mask | (b.output_counts > 0)
    rep = b.repetition_penalty[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - b.frequency_penalty[:, None] * b.output_counts
    logits = logits - b.presence_penalty[:, None] * (b.output_counts > 0).float()
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.top_k is None and b.top_p is None and b.min_p is None:
        return logits
    if b.min_p is not None:
        probs = logits.softmax(-1)
        thresh = probs.amax(-1, keepdim=True) * b.min_p[:, None]
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    if b.top_k is None and b.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if b.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        remove |= ranks >= b.top_k[:, None]
    if b.top_p is not None:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        before = probs.cumsum(-1) - probs
        remove |= before >= b.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits: [B, V] float32, raw from the LM head."""
    out = SamplerOutput(token_ids=torch.empty(0))
    if b.want_logprobs:
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(b.max_logprobs, dim=-1)
        out.top_logprobs, out.top_ids = top.values, top.indices

    if b.ban_rows is not None:
        logits = logits.index_put((b.ban_rows, b.ban_cols), torch.full((), float("-inf"), device=logits.device))
    if b.repetition_penalty is not None:
        logits = apply_penalties(logits, b)
    if b.all_greedy:
        out.token_ids = logits.argmax(-1)
    elif b.seeds is not None:
        from miniinfer.kernels.sampling import fused_sample
        if b.top_k is None and b.top_p is None and b.min_p is None:
            temps = torch.where(b.greedy, 0.0, b.temperature)
            out.token_ids = fused_sample(logits, temps, b.seeds)
        else:  # filter logits / T, then the same noise and argmax (greedy rows: T = 1, no noise)
            scaled = apply_top_k_top_p_min_p(logits / b.temperature[:, None], b)
            out.token_ids = fused_sample(scaled, (~b.greedy).float(), b.seeds)
    else:
        greedy_ids = logits.argmax(-1)
        scaled = apply_top_k_top_p_min_p(logits / b.temperature[:, None], b)
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs).exponential_()
        for i, g in enumerate(b.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(-1)
        out.token_ids = torch.where(b.greedy, greedy_ids, sampled)

    if b.want_logprobs:
        chosen = logprobs.gather(-1, out.token_ids[:, None])
        out.sampled_logprob = chosen.squeeze(-1)
        out.sampled_rank = (logprobs > chosen).sum(-1) + 1
    return out
