"""The torch attention backend against a naive per-sequence reference."""
from __future__ import annotations

import math

import pytest
import torch

from miniinfer.attention.torch_backend import TorchAttentionBackend
from miniinfer.kernels import cpu_kernels
from miniinfer.attention.metadata import AttentionMetadata

H, HKV, D, BS = 6, 2, 16, 4


def _reference(q, k_cache, v_cache, tables, q_lens, seq_lens, scale):
    """Each query token attends to its sequence's cached tokens up to its own position."""
    out, row = [], 0
    kf, vf = k_cache.float().flatten(0, 1), v_cache.float().flatten(0, 1)
    for table, n, L in zip(tables, q_lens, seq_lens):
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(L)])
        k = kf[slots].repeat_interleave(H // HKV, dim=1)  # [L, H, D]
        v = vf[slots].repeat_interleave(H // HKV, dim=1)
        for i in range(n):
            visible = L - n + i + 1
            s = torch.einsum("hd,lhd->hl", q[row].float(), k[:visible]) * scale
            out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v[:visible]))
            row += 1
    return torch.stack(out)


def _case(cache_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_lens, seq_lens = [1, 1, 1, 5, 3], [7, 13, 2, 5, 11]  # three decodes, a prefill, an extend
    nblocks = 40
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, at = [], 0
    for L in seq_lens:
        need = math.ceil(L / BS)
        tables.append(perm[at:at + need])
        at += need
    k_cache = torch.randn(nblocks, BS, HKV, D, generator=g).to(cache_dtype)
    v_cache = torch.randn(nblocks, BS, HKV, D, generator=g).to(cache_dtype)
    t = sum(q_lens)
    q = torch.randn(t, H, D, generator=g)
    # the new tokens' K/V: written by the backend into their slots before attending
    k_new, v_new = torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
    slots = [tab[p // BS] * BS + p % BS for tab, n, L in zip(tables, q_lens, seq_lens) for p in range(L - n, L)]
    width = max(map(len, tables))
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        num_decodes=3, num_decode_tokens=3, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([tab + [0] * (width - len(tab)) for tab in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return q, k_new, v_new, k_cache, v_cache, meta, tables, q_lens, seq_lens


def _backends():
    out = [TorchAttentionBackend]
    if cpu_kernels.available():
        from miniinfer.attention.cpu_backend import CPUAttentionBackend
        out.append(CPUAttentionBackend)
    return out


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.name)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_reference(backend, cache_dtype, q_dtype):
    q, k_new, v_new, kc, vc, meta, tables, q_lens, seq_lens = _case(cache_dtype)
    out = backend().forward(q.to(q_dtype), k_new.to(q_dtype), v_new.to(q_dtype), kc, vc,
                                          meta, D ** -0.5)
    assert out.dtype == q_dtype and out.shape == q.shape
    # the new K/V landed in their slots
    assert torch.equal(kc.flatten(0, 1)[meta.slot_mapping], k_new.to(q_dtype).to(cache_dtype))
    ref = _reference(q.to(q_dtype), kc, vc, tables, q_lens, seq_lens, D ** -0.5)
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max() < tol
    if backend is TorchAttentionBackend or cache_dtype != torch.float32:
        assert "torch_decode" in meta.per_step  # the decode gather plan is built once per step


def test_metadata_without_host_lists_is_not_cached():
    """Graph-style metadata is reused across replays with new device values: a plan cached on
    the first call would attend over the old lengths."""
    q, k_new, v_new, kc, vc, meta, tables, q_lens, seq_lens = _case(torch.float32, seed=1)
    meta.query_start_loc_cpu = meta.seq_lens_cpu = None
    backend = TorchAttentionBackend()
    backend.forward(q, k_new, v_new, kc, vc, meta, D ** -0.5)
    seq_lens2 = [5, 9, 2, 5, 11]  # shorter decode contexts, same tables
    meta.seq_lens.copy_(torch.tensor(seq_lens2, dtype=torch.int32))
    meta.slot_mapping = torch.tensor([tab[p // BS] * BS + p % BS for tab, n, L in zip(tables, q_lens, seq_lens2)
                                      for p in range(L - n, L)])
    out = backend.forward(q, k_new, v_new, kc, vc, meta, D ** -0.5)
    ref = _reference(q, kc, vc, tables, q_lens, seq_lens2, D ** -0.5)
    assert (out - ref).abs().max() < 1e-5
    assert not meta.per_step


@pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build here (no C compiler?)")
@pytest.mark.parametrize("max_pairs", [1 << 16, 10])  # all in C; the long chunks on torch SDPA
def test_cpu_backend_short_and_long_chunks(monkeypatch, max_pairs):
    from miniinfer.attention import cpu_backend
    monkeypatch.setattr(cpu_backend, "MAX_EXTEND_PAIRS", max_pairs)
    q, k_new, v_new, kc, vc, meta, tables, q_lens, seq_lens = _case(torch.float32, seed=3)
    out = cpu_backend.CPUAttentionBackend().forward(q, k_new, v_new, kc, vc, meta, D ** -0.5)
    ref = _reference(q, kc, vc, tables, q_lens, seq_lens, D ** -0.5)
    assert (out - ref).abs().max() < 1e-5
    assert ("cpu_rows" in meta.per_step) == (max_pairs > 10)
