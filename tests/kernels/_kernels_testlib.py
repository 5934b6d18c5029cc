"""Helpers shared by the kernel tests: paged-cache builders and an SDPA oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F

TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PagedKV:
    """Dense per-sequence K/V plus the same data scattered into a shuffled paged cache.

    Unused cache slots hold NaN, so any kernel that reads past a sequence's length (or
    through a wrong page) produces NaN and fails the comparison.
    """

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: str, extra_blocks: int = 3, fill_len: list[int] | None = None):
        self.seq_lens = list(seq_lens)
        self.block_size = block_size
        B = len(seq_lens)
        blocks_per = [cdiv(max(L, 1), block_size) for L in seq_lens]
        num_blocks = sum(blocks_per) + extra_blocks
        perm = torch.randperm(num_blocks).tolist()
        max_blocks = max(blocks_per) + 1
        self.block_tables = torch.zeros(B, max_blocks, dtype=torch.int32)
        self.k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        self.v_cache = torch.full_like(self.k_cache, float("nan"))
        self.k, self.v = [], []
        fill_len = fill_len if fill_len is not None else seq_lens
        i = 0
        for b, L in enumerate(seq_lens):
            ids = perm[i:i + blocks_per[b]]
            i += blocks_per[b]
            self.block_tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
            k = torch.randn(L, num_kv_heads, head_dim).to(dtype)
            v = torch.randn(L, num_kv_heads, head_dim).to(dtype)
            self.k.append(k.to(device))
            self.v.append(v.to(device))
            n = fill_len[b]  # tokens already in the cache (the rest are stored by the test)
            for t in range(n):
                blk, off = ids[t // block_size], t % block_size
                self.k_cache[blk, off] = k[t]
                self.v_cache[blk, off] = v[t]
        self.block_tables = self.block_tables.to(device)
        self.k_cache = self.k_cache.to(device)
        self.v_cache = self.v_cache.to(device)
        self.seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)

    def slots(self, b: int, start: int, end: int) -> list[int]:
        bt = self.block_tables[b].tolist()
        return [bt[t // self.block_size] * self.block_size + t % self.block_size for t in range(start, end)]


def sdpa_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D] at the last n positions of dense k/v [L, Hkv, D]; causal; fp32 SDPA."""
    n, H, D = q.shape
    L, Hkv, _ = k.shape
    G = H // Hkv
    qf = q.float().transpose(0, 1)  # [H, n, D]
    kf = k.float().repeat_interleave(G, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(G, dim=1).transpose(0, 1)
    qpos = torch.arange(L - n, L, device=q.device)[:, None]
    kpos = torch.arange(L, device=q.device)[None, :]
    mask = kpos <= qpos
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return o.transpose(0, 1).to(q.dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def cos_sin_cache(max_pos: int, rot_dim: int, device: str, base: float = 10000.0) -> torch.Tensor:
    """Plain RoPE table ``[max_pos, rot_dim]`` fp32: cos then sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous().to(device)
