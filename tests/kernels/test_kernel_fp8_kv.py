"""FP8 (e4m3) KV cache through the Triton kernels: the store quantizes (x / scale, saturated
to +-448), decode / extend attention read fp8 and apply k_scale / v_scale.

Each kernel is compared with its torch reference over the *same* fp8 cache (the reference
dequantizes, fp8 * scale: only compute order differs, so the model-dtype tolerance holds)
and with an SDPA oracle over the unquantized K/V (an fp8 rounding tolerance: e4m3 keeps 3
mantissa bits, a relative error up to 2^-4 per value, averaged down by the softmax sum).
"""
import pytest
import torch

from _kernels_testlib import PagedKV, assert_close, sdpa_oracle

FP8 = torch.float8_e4m3fn
E4M3_MIN_NORMAL = 2.0 ** -6  # the CPU interpreter flushes e4m3 subnormals to zero; GPUs keep them
DTYPES = [torch.float32, torch.bfloat16]
SCALES = [(1.0, 1.0), (0.5, 2.0)]


def _to_fp8(cache: torch.Tensor, scale: float) -> torch.Tensor:
    from miniinfer.kernels._common import quantize_fp8
    return quantize_fp8(cache, scale)  # NaN (unused slots) stays NaN: reading one fails the test


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _assert_fp8_equal(cache: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal wherever the value is a normal e4m3 number; within 2^-6 otherwise (NaN where NaN)."""
    a, b = cache.float(), ref.float()
    normal = b.abs() > E4M3_MIN_NORMAL  # the interpreter mis-rounds at the boundary too
    assert torch.equal(a[normal], b[normal])
    torch.testing.assert_close(a[~normal], b[~normal], atol=E4M3_MIN_NORMAL, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_store_kv_cache_fp8_quantizes_and_saturates(device, dtype, k_scale, v_scale):
    from miniinfer.kernels.kv_store import store_kv_cache, store_kv_cache_ref

    Hkv, D, bs, T, nblocks = 2, 64, 16, 6, 5
    k = (torch.randn(T, Hkv, D) * 100).to(dtype).to(device)  # many beyond 448 * scale
    v = (torch.randn(T, Hkv, D) * 100).to(dtype).to(device)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 448.0 * k_scale, 3.0], dtype=dtype)
    slots = torch.tensor([3, bs * 4 + bs - 1, -1, bs + 2, -1, 2 * bs], dtype=torch.int64, device=device)
    kc = torch.zeros(nblocks, bs, Hkv, D, dtype=FP8, device=device)
    vc = torch.zeros_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_cache(k, v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    store_kv_cache_ref(k, v, kc_ref, vc_ref, slots, k_scale=k_scale, v_scale=v_scale)
    _assert_fp8_equal(kc, kc_ref)
    _assert_fp8_equal(vc, vc_ref)
    assert not torch.isnan(kc.float()).any() and not torch.isnan(vc.float()).any()
    assert kc.float().abs().max().item() == 448.0  # saturated, not NaN / wrapped
    assert kc[0, 3, 0, :4].float().tolist()[:3] == [448.0, -448.0, 448.0]
    # dequantized values are within e4m3 rounding of the inputs that fit
    deq = kc[0, 3].float() * k_scale
    fits = k[0].float().abs() <= 448.0 * k_scale
    err = (deq - k[0].float()).abs()[fits]
    assert (err <= k[0].float().abs()[fits] * 2.0 ** -4 + E4M3_MIN_NORMAL * k_scale).all()
    assert torch.equal(kc[3].float(), torch.zeros_like(kc[3].float()))  # no slot there: untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("seq_lens,H,Hkv,D,bs,splits", [
    ([1, 17, 40, 100], 4, 2, 64, 16, 3),  # split-KV (stage 2), GQA 2
    ([33, 70], 6, 2, 32, 16, 1),          # direct output
])
@pytest.mark.parametrize("f16_dot", [False, True])  # the dots in q's dtype / in fp16
def test_decode_attention_fp8(device, dtype, k_scale, v_scale, seq_lens, H, Hkv, D, bs, splits, f16_dot):
    from miniinfer.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref

    kv = PagedKV(seq_lens, Hkv, D, bs, dtype, device)
    kc, vc = _to_fp8(kv.k_cache, k_scale), _to_fp8(kv.v_cache, v_scale)
    q = torch.randn(len(seq_lens), H, D, device=device).to(dtype)
    scale = D ** -0.5
    out = paged_decode_attention(q, kc, vc, kv.block_tables, kv.seq_lens_t, scale, num_splits=splits,
                                 max_seq_len=max(seq_lens), block_n=16, k_scale=k_scale, v_scale=v_scale,
                                 f16_dot=f16_dot)
    ref = paged_decode_attention_ref(q, kc, vc, kv.block_tables, kv.seq_lens_t, scale,
                                     k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref)
    for b in range(len(seq_lens)):
        oracle = sdpa_oracle(q[b:b + 1], kv.k[b], kv.v[b], scale)
        assert _rel_err(out[b:b + 1], oracle) < 0.06, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_extend_attention_fp8(device, dtype, k_scale, v_scale):
    from miniinfer.kernels.extend_attention import paged_extend_attention, paged_extend_attention_ref

    prefix, qlens, H, Hkv, D, bs = [0, 5, 20], [7, 40, 3], 6, 2, 64, 16
    seq_lens = [p + n for p, n in zip(prefix, qlens)]
    kv = PagedKV(seq_lens, Hkv, D, bs, dtype, device)
    kc, vc = _to_fp8(kv.k_cache, k_scale), _to_fp8(kv.v_cache, v_scale)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(int(qsl[-1]), H, D, device=device).to(dtype)
    scale = D ** -0.5
    out = paged_extend_attention(q, kc, vc, kv.block_tables, qsl, kv.seq_lens_t, max(qlens), scale,
                                 block_m=32, block_n=16, k_scale=k_scale, v_scale=v_scale)
    ref = paged_extend_attention_ref(q, kc, vc, kv.block_tables, qsl, kv.seq_lens_t, scale,
                                     k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref)
    for b in range(len(qlens)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        assert _rel_err(out[s:e], sdpa_oracle(q[s:e], kv.k[b], kv.v[b], scale)) < 0.06, b


def test_extend_attention_fp8_tree_mask(device):
    """The HAS_TREE variant over an fp8 cache: tree rows by their bits, the rest causal."""
    from miniinfer.kernels.extend_attention import paged_extend_attention, paged_extend_attention_ref

    prefix, qlens, H, Hkv, D, bs = [70, 3], [8, 8], 4, 2, 32, 16
    seq_lens = [p + n for p, n in zip(prefix, qlens)]
    kv = PagedKV(seq_lens, Hkv, D, bs, torch.float32, device)
    kc, vc = _to_fp8(kv.k_cache, 0.5), _to_fp8(kv.v_cache, 2.0)
    qsl = torch.tensor([0, 8, 16], dtype=torch.int32, device=device)
    q = torch.randn(16, H, D, device=device)
    g = torch.Generator().manual_seed(5)
    bits = []
    for n in qlens:  # rows 0..5 tree rows (random bits plus their own key), rows 6, 7 causal
        for i in range(n):
            own = 1 << (64 - n + i)
            rnd = int(torch.randint(0, 1 << 62, (1,), generator=g))
            bits.append((rnd | own) if i < 6 else -1)
    tree = torch.tensor(bits, dtype=torch.int64, device=device)
    out = paged_extend_attention(q, kc, vc, kv.block_tables, qsl, kv.seq_lens_t, 8, 0.2,
                                 block_m=16, block_n=16, tree_mask=tree, k_scale=0.5, v_scale=2.0)
    ref = paged_extend_attention_ref(q, kc, vc, kv.block_tables, qsl, kv.seq_lens_t, 0.2,
                                     tree_mask=tree, k_scale=0.5, v_scale=2.0)
    assert_close(out, ref)


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_triton_backend_fp8_matches_torch_backend(device, k_scale, v_scale):
    """A mixed decode + extend step (store, then attention) through the triton backend and the
    torch backend, both over fp8 caches with the same scales: same cache bytes, close outputs."""
    from test_kernel_triton_backend import _step

    from miniinfer.attention import get_backend
    from miniinfer.attention.torch_backend import TorchAttentionBackend

    kv, q, k, v, meta, order = _step([16, 40, 4, 0, 21], [1, 1, 1, 20, 5], 3, 6, 2, 64, 16,
                                     torch.float32, device, pad=1)
    # no NaN sentinels here: the torch path gathers (masked) padding too, and 0 * NaN is NaN
    kc, vc = _to_fp8(kv.k_cache.nan_to_num(), k_scale), _to_fp8(kv.v_cache.nan_to_num(), v_scale)
    kc2, vc2 = kc.clone(), vc.clone()
    outs = []
    for backend, caches in ((get_backend("triton", "cuda"), (kc, vc)), (TorchAttentionBackend(), (kc2, vc2))):
        backend.k_scale, backend.v_scale = k_scale, v_scale
        outs.append(backend.forward(q, k, v, *caches, meta, 0.125))
    _assert_fp8_equal(kc, kc2)
    _assert_fp8_equal(vc, vc2)
    qsl = meta.query_start_loc_cpu
    for row, i in enumerate(order):
        if i is not None:
            s, e = qsl[row], qsl[row + 1]
            # the interpreter's store flushes e4m3 subnormals (< 2^-6) that torch keeps: a hair looser
            torch.testing.assert_close(outs[0][s:e], outs[1][s:e], atol=5e-3 * v_scale, rtol=5e-3)
            assert _rel_err(outs[0][s:e], sdpa_oracle(q[s:e], kv.k[i], kv.v[i], 0.125)) < 0.06
