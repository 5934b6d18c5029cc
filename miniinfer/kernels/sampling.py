"""Fused sampling: temperature + Gumbel noise + argmax in one pass over the logits.

Sampling token i with probability softmax(x / T)_i is the same as taking
``argmax_i(x_i / T + g_i)`` with g_i = -log(-log(u_i)) and u_i uniform (the Gumbel-max
trick). That needs no softmax and no materialised probabilities: one read of the logits.

The noise comes from Philox keyed by a per-row seed and the vocabulary index, so a row's
draw depends only on its own seed (the engine derives it from the request's seed and the
output position: reproducible whatever else is in the batch).

Grid ``(B, num_chunks)``: each program scans one chunk of the vocabulary and writes its best
(score, index); a tiny torch reduction over the chunks picks the winner. Ties go to the
lowest index, as ``torch.argmax`` does, so greedy rows (temperature <= 0: no noise, no
scaling) return exactly ``logits.argmax(-1)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 8192  # vocabulary entries per program
_BLOCK = 1024


@triton.jit
def _gumbel(seed, offs):
    u = tl.rand(seed, offs)  # [0, 1)
    u = tl.maximum(u, 1.0e-10)
    return -tl.log(-tl.log(u))


@triton.jit(do_not_specialize=["V", "stride_l"])
def _sample_chunk_kernel(logits_ptr, stride_l, temp_ptr, seed_ptr, best_val_ptr, best_idx_ptr, V,
                         num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    greedy = t <= 0.0
    t = tl.where(greedy, 1.0, t)
    noise_scale = tl.where(greedy, 0.0, 1.0)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_l
    start = chunk * CHUNK
    for v0 in range(start, start + CHUNK, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        # correctly rounded x / t, as torch divides: the filtered path (logits / T in torch,
        # then T = 1 here) scores exactly like this one
        score = tl.math.div_rn(x, t) + noise_scale * _gumbel(seed, offs)
        score = tl.where(mask, score, float("-inf"))
        better = score > best_val  # strict: each lane keeps its first (lowest) index on ties
        best_val = tl.where(better, score, best_val)
        best_idx = tl.where(better, offs, best_idx)
    m = tl.max(best_val, 0)
    idx = tl.min(tl.where(best_val == m, best_idx, 2147483647), 0)
    tl.store(best_val_ptr + row * num_chunks + chunk, m)
    tl.store(best_idx_ptr + row * num_chunks + chunk, idx)


@triton.jit(do_not_specialize=["V", "stride_n"])
def _gumbel_noise_kernel(out_ptr, stride_n, seed_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr + row)
    tl.store(out_ptr + row.to(tl.int64) * stride_n + offs, _gumbel(seed, offs), mask=offs < V)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Token ids [B] (int64): ``argmax(logits / T + Gumbel(seed))`` per row; rows with
    ``temperature <= 0`` get ``argmax(logits)``. logits [B, V] (last dim contiguous)."""
    B, V = logits.shape
    assert logits.stride(1) == 1 and temperature.shape[0] >= B and seeds.shape[0] >= B
    if B == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    chunks = triton.cdiv(V, _CHUNK)
    best_val = torch.empty(B, chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(B, chunks, dtype=torch.int32, device=logits.device)
    _sample_chunk_kernel[(B, chunks)](logits, logits.stride(0), temperature, seeds, best_val, best_idx, V,
                                      chunks, CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=4)
    # first chunk holding the maximum (argmax returns the first): lowest index on ties
    win = best_val.argmax(-1, keepdim=True)
    ids = best_idx.gather(-1, win).squeeze(-1).to(torch.int64)
    return torch.where(ids < V, ids, 0)  # a row of all -inf: index 0, as argmax gives


def gumbel_noise(seeds: torch.Tensor, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The same Gumbel noise ``fused_sample`` adds, materialised as [batch, vocab] fp32 (for
    rows whose logits need filtering (top-k / top-p / min-p) before the argmax)."""
    out = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    if batch:
        _gumbel_noise_kernel[(batch, triton.cdiv(vocab, _BLOCK))](out, out.stride(0), seeds, vocab, BLOCK=_BLOCK)
    return out
