"""``SamplingMetadata``: one step's sampling parameters as device tensors.

Built once per step from the sampling sequences (row order = logits row order). Only the
features some row uses are materialized; host lists reach the device through the runner's
pinned staging (no sync). On CUDA each sampled row also gets a 31-bit Philox seed for the
fused sampling kernel: for seeded requests a splitmix64 hash of (seed + choice index, output
position), so a seeded request samples the same tokens whatever else is in the batch."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from miniinfer.engine.sequence import Sequence
from miniinfer.sampling_params import GREEDY_TEMPERATURE
from miniinfer.sample.logits_processors import LOGITS_PROCESSORS, BatchView, LogitsProcessor, ToDevice


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32 (greedy rows, T < GREEDY_TEMPERATURE, hold 1.0)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where unused
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    generators: list[torch.Generator | None]  # per-row seeded RNGs (CPU sampling path)
    all_greedy: bool
    want_logprobs: bool  # some row asked for logprobs
    max_logprobs: int  # the largest top-N asked for (may be 0: the sampled token's only)
    # the logits processors some row needs this step, in order, with their prepared state
    processors: list[tuple[LogitsProcessor, object]] = field(default_factory=list)
    seeds: torch.Tensor | None = None  # [B] int64, CUDA only: Philox seeds (see module doc)
    # structured output: the step's grammar mask (``GrammarBitmask``: ``apply(logits)``), or None
    grammar_bitmask: object | None = None

    def processor_state(self, name: str) -> object | None:
        return next((st for p, st in self.processors if p.name == name), None)

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device,
              eos_token_ids=(), to_device: ToDevice | None = None,
              rng: random.Random | None = None) -> "SamplingMetadata":
        """``to_device(values, dtype)`` copies a host list to the device without a sync
        (the runner passes its pinned staging); default: a plain copy."""
        def dev(values, dtype):
            if to_device is not None:
                return to_device(values, dtype)
            return torch.tensor(values, dtype=dtype).to(device)

        params = [s.params for s in seqs]
        view = BatchView(seqs, params, vocab_size, device, tuple(eos_token_ids), dev)
        processors = [(p, st) for p in LOGITS_PROCESSORS if (st := p.prepare(view)) is not None]
        greedy_list = [p.temperature < GREEDY_TEMPERATURE for p in params]
        need_topk = any(p.top_k > 0 for p in params)
        need_topp = any(p.top_p < 1.0 for p in params)
        need_minp = any(p.min_p > 0.0 for p in params)
        lp = [p.logprobs for p in params]
        seeds = None
        if device.type == "cuda" and not all(greedy_list):
            rng = rng or random.Random()
            seeds = dev([_row_seed(p.seed + s.index, s.num_output_tokens + s.num_pending) if p.seed is not None
                         else rng.getrandbits(31) for p, s in zip(params, seqs)], torch.int64)
        return cls(
            temperature=dev([1.0 if g else p.temperature for g, p in zip(greedy_list, params)], torch.float32),
            greedy=dev(greedy_list, torch.bool),
            top_k=dev([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], torch.int64)
            if need_topk else None,
            top_p=dev([p.top_p for p in params], torch.float32) if need_topp else None,
            min_p=dev([p.min_p for p in params], torch.float32) if need_minp else None,
            generators=[s.generator for s in seqs],
            all_greedy=all(greedy_list),
            want_logprobs=any(x is not None for x in lp),
            max_logprobs=max((x for x in lp if x is not None), default=0),
            processors=processors,
            seeds=seeds,
        )


_MASK64 = (1 << 64) - 1


def _row_seed(base: int, position: int) -> int:
    """A 31-bit Philox seed for (request seed + choice index, output position): splitmix64."""
    x = (base * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF
