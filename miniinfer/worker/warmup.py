"""Warm-up: compile every Triton specialization before the first request.

Synthetic steps over the real cache: prefill, extend over a cached prefix, mixed prefill +
decode, decode batches; greedy, top-k/top-p/min-p, and penalties + seed + logprobs sampling.
"""
from __future__ import annotations

import torch

from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput
from miniinfer.sampling_params import SamplingParams

# (prompt lengths, new tokens per sequence), chosen to hit Triton's int specializations and the
# extend kernel's query-tile sizes (16, 32, 64, 128 rows: max_query_len 16, 24, 37, 130)
PLANS = [
    ([1], [1]), ([16], [16]), ([24], [24]), ([37], [37]), ([64, 37], [64, 37]), ([300, 17], [44, 1]),
    ([200, 150, 9], [1, 130, 9]),  # >64 new tokens: the largest extend query tile
    ([33, 20, 9], [1, 1, 1]), ([129] * 5, [1] * 5),
    ([40, 21], [1, 1]),  # 2 rows: the decode GEMV's 2-row kernels (models/linear.py), compiled before graph capture
    # >= 1024 new tokens: the long-chunk extend tiles, without and with a cached prefix (with
    # prefill_attention="auto": the split path's cuDNN call and the prefix + merge kernel)
    ([1100], [1100]), ([2200], [1100]),
]


def warmup_schedules(block_size: int, num_blocks: int, max_model_len: int, device: torch.device,
                     max_num_seqs: int) -> list[SchedulerOutput]:
    """The synthetic steps, each with at most ``max_num_seqs`` sequences (the runner's sampled-ids
    buffers hold that many rows: an engine with ``max_num_seqs=1`` failed its warm-up)."""
    samplers = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05),
                SamplingParams(temperature=1.0, repetition_penalty=1.1, presence_penalty=0.1, seed=1,
                               logprobs=2)]
    out = []
    for i, (lens, news) in enumerate(PLANS):
        sched = SchedulerOutput()
        next_block = 0
        for ln, n in list(zip(lens, news))[:max(max_num_seqs, 1)]:
            ln = min(ln, max_model_len - 1)
            seq = Sequence("warmup", 0, [1] * ln, ln, samplers[i % len(samplers)])
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=device).manual_seed(0)
            nb = -(-ln // block_size)
            if next_block + nb > num_blocks:
                break
            seq.block_table = list(range(next_block, next_block + nb))
            next_block += nb
            sched.scheduled.append(ScheduledSeq(seq, min(n, ln), ln - min(n, ln)))
        if sched.scheduled:
            sched.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
            out.append(sched)
    return out
