"""Paged decode / extend attention kernels vs torch references and an SDPA oracle."""
import pytest
import torch

from _kernels_testlib import PagedKV, assert_close, sdpa_oracle

ATTN_DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else [])


def _decode_q(seq_lens, H, D, dtype, device):
    return torch.randn(len(seq_lens), H, D, device=device).to(dtype)


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize(
    "seq_lens,H,Hkv,D,bs,splits,block_n",
    [
        # G=1, tiles of 16 tokens spanning one page each, forced 3 splits (context > a split)
        ([1, 17, 40, 100], 4, 4, 64, 16, 3, 16),
        # G=3, head_dim 128, 64-token tiles spanning 4 pages, automatic split count
        ([5, 33, 70], 6, 2, 128, 16, None, None),
        # pages larger than a tile, single split (direct-output path), head_dim 32
        ([50, 64, 65], 3, 1, 32, 32, 1, 16),
        # 19 splits of one tile: stage 2 merges in several chunks; G=2
        ([300, 40, 129], 2, 1, 64, 16, 19, 16),
        # few programs, long context: the automatic split count splits
        ([300, 257], 2, 1, 64, 16, None, None),
    ],
)
def test_paged_decode_attention(device, dtype, seq_lens, H, Hkv, D, bs, splits, block_n):
    from miniinfer.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref

    kv = PagedKV(seq_lens, Hkv, D, bs, dtype, device)
    q = _decode_q(seq_lens, H, D, dtype, device)
    scale = D ** -0.5
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, scale,
                                 num_splits=splits, max_seq_len=max(seq_lens), block_n=block_n)
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, scale)
    assert_close(out, ref)
    for b in range(len(seq_lens)):
        assert_close(out[b:b + 1], sdpa_oracle(q[b:b + 1], kv.k[b], kv.v[b], scale))


def test_decode_bound_violation_and_empty(device):
    """max_seq_len below the real context (partitions follow the real length), a zero-length
    sequence (zeros out), strided q, and caller-provided out / workspaces."""
    from miniinfer.kernels.decode_attention import (decode_split_config, decode_workspace_shapes,
                                                    paged_decode_attention, paged_decode_attention_ref)

    dtype, H, Hkv, D, bs = torch.float32, 4, 2, 64, 16
    seq_lens = [90, 0, 7]
    kv = PagedKV(seq_lens, Hkv, D, bs, dtype, device)
    q = torch.randn(len(seq_lens), 2 * H, D, device=device)[:, ::2]  # head stride 2*D
    scale = 0.1
    splits = decode_split_config(3, Hkv, 32, torch.device(device), num_splits=2, block_n=16)
    assert splits == 2
    mo_shape, ml_shape = decode_workspace_shapes(3, H, D, splits + 2)
    mid_out = torch.empty(mo_shape, device=device)
    mid_lse = torch.empty(ml_shape, device=device)
    out = torch.full((3, H, D), float("nan"), device=device)
    res = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, scale,
                                 out=out, num_splits=2, max_seq_len=32, mid_out=mid_out,
                                 mid_lse=mid_lse, block_n=16)
    assert res is out
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, scale)
    assert_close(out, ref)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_loose_bound_spreads_short_contexts(device):
    """A CUDA-graph-style bound far above the real contexts: the many splits chosen for it
    share the short contexts out (most programs find an empty partition) and stay exact."""
    from miniinfer.kernels.decode_attention import (decode_split_config, paged_decode_attention,
                                                    paged_decode_attention_ref)

    H, Hkv, D, bs = 4, 2, 64, 16
    seq_lens = [130, 1, 64]
    assert decode_split_config(3, Hkv, 131072, torch.device(device), block_n=16) >= 6
    kv = PagedKV(seq_lens, Hkv, D, bs, torch.float32, device)
    q = _decode_q(seq_lens, H, D, torch.float32, device)
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, 0.125,
                                 max_seq_len=131072, block_n=16)
    assert_close(out, paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, 0.125))



def test_decode_full_batch_long_bound_keeps_short_contexts_whole(device):
    """A batch that fills the SMs, split only because its bound is long: contexts shorter
    than the minimum partition stay one partition, longer ones split; all exact."""
    from miniinfer.kernels.decode_attention import (_LONG_MIN_PARTITION, decode_split_config,
                                                    decode_workspace_shapes, paged_decode_attention,
                                                    paged_decode_attention_ref)
    from miniinfer.kernels._common import num_sms

    H, Hkv, D, bs = 4, 2, 32, 16
    B = -(-2 * num_sms(torch.device(device)) // Hkv)  # enough programs to fill the SMs
    seq_lens = [([1, 100, 2 * _LONG_MIN_PARTITION + 70] * B)[i] for i in range(B)]
    assert decode_split_config(B, Hkv, 32768, torch.device(device), block_n=64) == 4
    kv = PagedKV(seq_lens, Hkv, D, bs, torch.float32, device)
    q = _decode_q(seq_lens, H, D, torch.float32, device)
    mo_shape, ml_shape = decode_workspace_shapes(B, H, D, 4)
    mid_lse = torch.full(ml_shape, float("nan"), device=device)
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, 0.2,
                                 max_seq_len=32768, block_n=64, mid_lse=mid_lse,
                                 mid_out=torch.empty(mo_shape, device=device))
    assert_close(out, paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens_t, 0.2))
    written = (~torch.isnan(mid_lse[:, 0])).sum(-1).tolist()  # partitions each sequence used
    assert written == [-(-n // _LONG_MIN_PARTITION) for n in seq_lens]  # 1, 1, 3, ...

def test_decode_split_config_is_host_only():
    from miniinfer.kernels.decode_attention import decode_split_config

    cpu = torch.device("cpu")
    # few programs and a long bound: split, at most one split per 128 tokens of the bound
    s = decode_split_config(1, 2, 4096, cpu, block_n=64)
    assert 1 < s <= 4096 // 128
    # the split count never exceeds the number of tiles
    assert decode_split_config(1, 1, 10, cpu, num_splits=8, block_n=16) == 1
    # plenty of programs: no split below a 16k bound; 2 to 4 splits above it (unequal long contexts)
    assert decode_split_config(64, 8, 4096, cpu) == 1
    assert decode_split_config(64, 8, 16384, cpu) == 2
    assert decode_split_config(64, 8, 32768, cpu) == decode_split_config(64, 8, 131072, cpu) == 4


# ---------------------------------------------------------------- extend
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize(
    "prefix,qlens,H,Hkv,D,bs,block_m,block_n",
    [
        # G=3, several query tiles; band wider than a kv tile; prefix not page aligned
        ([0, 5, 20], [7, 40, 3], 6, 2, 64, 16, 32, 16),
        # G=1, head_dim 128, default tiles (one query tile per sequence)
        ([0, 37], [19, 12], 2, 2, 128, 16, None, None),
        # pages of 32, kv tile of 16 (tile inside a page), single token "extend", head_dim 32
        ([31, 0, 64], [1, 33, 16], 4, 1, 32, 32, 16, 16),
    ],
)
def test_paged_extend_attention(device, dtype, prefix, qlens, H, Hkv, D, bs, block_m, block_n):
    from miniinfer.kernels.extend_attention import paged_extend_attention, paged_extend_attention_ref

    seq_lens = [p + n for p, n in zip(prefix, qlens)]
    kv = PagedKV(seq_lens, Hkv, D, bs, dtype, device)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=device)
    T = int(qsl[-1])
    q = torch.randn(T, H, D, device=device).to(dtype)
    scale = D ** -0.5
    out = paged_extend_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t,
                                 max(qlens), scale, block_m=block_m, block_n=block_n)
    ref = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, scale)
    assert_close(out, ref)
    for b in range(len(qlens)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        assert_close(out[s:e], sdpa_oracle(q[s:e], kv.k[b], kv.v[b], scale))


def test_extend_absolute_query_rows(device):
    """query_start_loc need not start at 0: rows before qsl[0] of out are left alone."""
    from miniinfer.kernels.extend_attention import paged_extend_attention

    H, Hkv, D, bs = 2, 1, 64, 16
    kv = PagedKV([10, 21], Hkv, D, bs, torch.float32, device)
    q = torch.randn(3 + 4 + 6, H, D, device=device)
    qsl = torch.tensor([3, 7, 13], dtype=torch.int32, device=device)
    out = torch.full_like(q, 7.0)
    paged_extend_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, 6, 0.125, out=out)
    assert torch.equal(out[:3], torch.full_like(out[:3], 7.0))
    assert_close(out[3:7], sdpa_oracle(q[3:7], kv.k[0], kv.v[0], 0.125))
    assert_close(out[7:], sdpa_oracle(q[7:], kv.k[1], kv.v[1], 0.125))
