"""The split prefill path: the prefix-only kernel (LSE, merge) and the backend's routing.

On CPU the Triton kernels run under the interpreter and the new-token partial comes from
torch's CPU flash op; ``test_split_matches_plain_kernel_gpu`` runs the bench shapes on CUDA.
"""
import math

import pytest
import torch

from _kernels_testlib import PagedKV, assert_close

HAS_CUDA = torch.cuda.is_available()


def _extend_inputs(prefix, qlens, H, Hkv, D, bs, dtype, device, stored=True):
    """A paged cache holding prefix + new tokens (``stored``) and q rows [sum(qlens), H, D]."""
    seq_lens = [p + n for p, n in zip(prefix, qlens)]
    kv = PagedKV(seq_lens, Hkv, D, bs, dtype, device, fill_len=seq_lens if stored else prefix)
    q = torch.randn(sum(qlens), H, D, device=device).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return kv, q, qsl


def _prefix_ref(q, kv, qsl, prefix, scale):
    """fp32 attention of each sequence's rows over its first ``prefix[b]`` keys: (o, lse [H, T])."""
    T, H, D = q.shape
    o = torch.zeros(T, H, D)
    lse = torch.full((H, T), float("-inf"))
    for b, p in enumerate(prefix):
        s, e = int(qsl[b]), int(qsl[b + 1])
        if p == 0 or e == s:
            continue
        G = H // kv.k[b].shape[1]
        k = kv.k[b][:p].float().cpu().repeat_interleave(G, dim=1)
        v = kv.v[b][:p].float().cpu().repeat_interleave(G, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[s:e].float().cpu(), k) * scale
        lse[:, s:e] = scores.logsumexp(-1)
        o[s:e] = torch.einsum("hql,lhd->qhd", scores.softmax(-1), v)
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_only_writes_lse(device, dtype):
    from miniinfer.kernels.extend_attention import paged_prefix_attention

    prefix, qlens, H, Hkv, D, bs = [0, 37, 70], [5, 20, 33], 4, 2, 32, 16
    kv, q, qsl = _extend_inputs(prefix, qlens, H, Hkv, D, bs, dtype, device)
    scale = 1 / math.sqrt(D)
    lse = torch.empty(H, q.shape[0] + 3, dtype=torch.float32, device=device)
    out = paged_prefix_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, max(qlens),
                                 scale, lse_out=lse[:, 3:], lse_row0=0, block_m=16, block_n=16)
    o_ref, lse_ref = _prefix_ref(q, kv, qsl, prefix, scale)
    rows = slice(qlens[0], None)  # sequence 0 has no prefix: its rows are 0 / -inf
    assert_close(out[rows].cpu(), o_ref[rows].to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[:, 3:][:, rows].cpu(), lse_ref[:, rows], atol=tol, rtol=tol)
    assert torch.isneginf(lse[:, 3:3 + qlens[0]]).all() and (out[:qlens[0]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_only_fp8_cache_equals_dequantized_cache(device, dtype):
    """Over an FP8 cache the prefix-only kernel applies k_scale / v_scale: its output and LSE
    equal those over a cache of the dequantized values (fp8 * scale) in the model dtype."""
    from miniinfer.kernels._common import dequantize_fp8, quantize_fp8
    from miniinfer.kernels.extend_attention import paged_prefix_attention

    prefix, qlens, H, Hkv, D, bs = [37, 70], [20, 33], 4, 2, 32, 16
    kv, q, qsl = _extend_inputs(prefix, qlens, H, Hkv, D, bs, dtype, device)
    k_scale, v_scale = 0.05, 0.02
    kc8, vc8 = quantize_fp8(kv.k_cache, k_scale), quantize_fp8(kv.v_cache, v_scale)
    kc, vc = dequantize_fp8(kc8, k_scale, dtype), dequantize_fp8(vc8, v_scale, dtype)
    scale = 1 / math.sqrt(D)
    outs, lses = [], []
    for caches, scales in (((kc8, vc8), (k_scale, v_scale)), ((kc, vc), (1.0, 1.0))):
        lse = torch.empty(H, q.shape[0], dtype=torch.float32, device=device)
        outs.append(paged_prefix_attention(q, *caches, kv.block_tables, qsl, kv.seq_lens_t, max(qlens), scale,
                                           lse_out=lse, block_m=16, block_n=16, k_scale=scales[0],
                                           v_scale=scales[1]))
        lses.append(lse)
    assert_close(outs[0], outs[1])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lses[0], lses[1], atol=tol, rtol=tol)


def _new_token_partial(q, k_new, v_new, qsl, scale):
    """Causal attention of each sequence's rows over its own new keys with the CPU flash op:
    (o [T, H, D], lse [H, T])."""
    outs, lses = [], []
    for b in range(qsl.shape[0] - 1):
        s, e = int(qsl[b]), int(qsl[b + 1])
        G = q.shape[1] // k_new[b].shape[1]
        qs = q[s:e].float().cpu().transpose(0, 1)[None]
        ks = k_new[b].float().cpu().repeat_interleave(G, dim=1).transpose(0, 1)[None]
        vs = v_new[b].float().cpu().repeat_interleave(G, dim=1).transpose(0, 1)[None]
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, True, scale=scale)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_merge_equals_full_attention(device, dtype):
    from miniinfer.attention.prefill_split import merge_attn_states
    from miniinfer.kernels.extend_attention import paged_extend_attention_ref, paged_prefix_attention

    prefix, qlens, H, Hkv, D, bs = [0, 45, 19], [9, 24, 17], 6, 2, 32, 8
    kv, q, qsl = _extend_inputs(prefix, qlens, H, Hkv, D, bs, dtype, device)
    scale = 1 / math.sqrt(D)
    k_new = [kv.k[b][p:] for b, p in enumerate(prefix)]
    v_new = [kv.v[b][p:] for b, p in enumerate(prefix)]
    o_new, lse_new = _new_token_partial(q, k_new, v_new, qsl.cpu(), scale)
    ref = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, scale)
    # the torch merge of the two partials
    o_pre, lse_pre = _prefix_ref(q, kv, qsl.cpu(), prefix, scale)
    merged, _ = merge_attn_states(o_pre, lse_pre, o_new, lse_new)
    assert_close(merged.to(dtype), ref.cpu())
    # the kernel's fused merge, with the partial's rows offset by lse_row0 (one sequence)
    out = torch.full_like(q, float("nan"))
    s, e = int(qsl[1]), int(qsl[2])
    o_in = o_new[s:e].to(device=device, dtype=dtype)
    paged_prefix_attention(q, kv.k_cache, kv.v_cache, kv.block_tables[1:2], qsl[1:3], kv.seq_lens_t[1:2],
                           e - s, scale, out=out, merge_with=(o_in, lse_new[:, s:e].to(device)), lse_row0=s,
                           block_m=16, block_n=16)
    assert_close(out[s:e], ref[s:e])
    assert torch.isnan(out[:s]).all() and torch.isnan(out[e:]).all()


def _split_step(prefix, qlens, num_decodes, H, Hkv, D, bs, dtype, device):
    """A step's tensors: the cache holds every token (as after store_kv_cache), k/v the new rows."""
    from miniinfer.attention.metadata import AttentionMetadata

    kv, q, qsl = _extend_inputs(prefix, qlens, H, Hkv, D, bs, dtype, device)
    k = torch.cat([kv.k[b][p:] for b, p in enumerate(prefix)])
    v = torch.cat([kv.v[b][p:] for b, p in enumerate(prefix)])
    slots = torch.cat([torch.tensor(kv.slots(b, p, p + n)) for b, (p, n) in enumerate(zip(prefix, qlens))])
    lens = [p + n for p, n in zip(prefix, qlens)]
    meta = AttentionMetadata(
        num_decodes=num_decodes, num_decode_tokens=num_decodes, query_start_loc=qsl,
        seq_lens=kv.seq_lens_t, block_tables=kv.block_tables, slot_mapping=slots.to(device),
        max_query_len=max(qlens), max_seq_len=max(lens),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=lens)
    return kv, q, k, v, meta


def test_backend_routes_long_chunks(device):
    from miniinfer.attention import get_backend
    from miniinfer.kernels.extend_attention import paged_extend_attention_ref

    # decodes, a long chunk with a prefix, a short one, a long one without prefix, a short one
    prefix, qlens = [30, 12, 40, 0, 0, 7], [1, 1, 40, 5, 33, 3]
    H, Hkv, D, bs = 4, 2, 32, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CUDA: the SDPA ops take no fp32
    kv, q, k, v, meta = _split_step(prefix, qlens, 2, H, Hkv, D, bs, dtype, device)
    backend = get_backend("triton", "cuda")
    backend.set_prefill_attention("auto")
    backend.split_min_query_len = 32
    plan = backend._split_plan(q, meta, 2)
    assert [x[0] for x in plan.long] == [2, 4] and plan.runs == ((3, 4, 5), (5, 6, 3))
    out = backend.forward(q, k, v, kv.k_cache, kv.v_cache, meta, 1 / math.sqrt(D))
    ref = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, meta.query_start_loc,
                                     kv.seq_lens_t, 1 / math.sqrt(D))
    assert_close(out, ref)
    with pytest.raises(ValueError, match="prefill_attention"):
        backend.set_prefill_attention("cudnn")
    backend.set_prefill_attention("triton")
    assert backend._split_plan(q, meta, 2) is None



def test_backend_split_path_fp8_cache_matches_plain_kernel(device):
    """With an FP8 cache the split path rounds the new tokens' k/v through e4m3 as the cache
    holds them, so it gives the plain kernel's result (which reads everything from the cache)
    up to compute order, not an fp8 rounding apart."""
    from miniinfer.attention import get_backend
    from miniinfer.kernels._common import quantize_fp8

    prefix, qlens = [30, 40, 0], [1, 40, 33]
    H, Hkv, D, bs = 4, 2, 32, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kv, q, k, v, meta = _split_step(prefix, qlens, 1, H, Hkv, D, bs, dtype, device)
    k_scale, v_scale = 0.5, 0.25
    outs = {}
    for mode in ("auto", "triton"):
        backend = get_backend("triton", "cuda")
        backend.k_scale, backend.v_scale = k_scale, v_scale
        backend.set_prefill_attention(mode)
        backend.split_min_query_len = 32
        kc, vc = quantize_fp8(kv.k_cache, k_scale), quantize_fp8(kv.v_cache, v_scale)
        if mode == "auto":
            assert [x[0] for x in backend._split_plan(q, meta, 1).long] == [1, 2]
        outs[mode] = backend.forward(q, k, v, kc, vc, meta, 1 / math.sqrt(D))
    assert_close(outs["auto"], outs["triton"])

# ---- GPU: the bench shapes, split path vs the plain kernel (bf16) --------------------------

GPU_SHAPES = [(8192, 0), (8192, 8192), (4096, 0), (2048, 4096), (512, 6000)]


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (SDPA cuDNN/flash ops)")
@pytest.mark.parametrize("heads", [(28, 4), (16, 8)], ids=["qwen2-7b", "qwen3-0.6b"])
@pytest.mark.parametrize("q_len,prefix", GPU_SHAPES)
def test_split_matches_plain_kernel_gpu(heads, q_len, prefix):
    from miniinfer.attention.prefill_split import plan_split, split_extend_attention
    from miniinfer.kernels.extend_attention import paged_extend_attention

    H, Hkv = heads
    D, bs, dtype, device = 128, 16, torch.bfloat16, "cuda"
    # a decode first, then the long chunk, then a short chunk: the routing around it too
    kv, q, k, v, meta = _split_step([100, prefix, 50], [1, q_len, 7], 1, H, Hkv, D, bs, dtype, device)
    scale = 1 / math.sqrt(D)
    plain = paged_extend_attention(q, kv.k_cache, kv.v_cache, kv.block_tables[1:], meta.query_start_loc[1:],
                                   kv.seq_lens_t[1:], q_len, scale)
    plan = plan_split(meta, 1, min_query_len=min(q_len, 1024))
    assert len(plan.long) == 1
    out = torch.zeros_like(q)
    split_extend_attention(q, k, v, kv.k_cache, kv.v_cache, meta, plan, scale, out)
    torch.testing.assert_close(out[1:].float(), plain[1:].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (SDPA cuDNN/flash ops)")
@pytest.mark.parametrize("op", ["flash", "cudnn"])
def test_sdpa_op_lse_gpu(op):
    """Each LSE op the split path may pick: output and natural-log LSE [H, n] vs fp32 torch."""
    from miniinfer.attention.prefill_split import _run_op

    H, Hkv, n, D = 8, 2, 300, 128
    q = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, Hkv, D, device="cuda", dtype=torch.bfloat16)
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    try:
        o, lse = _run_op(op, q.transpose(0, 1)[None], kr.transpose(0, 1)[None], vr.transpose(0, 1)[None],
                         0.088, True)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{op} unavailable here: {exc}")
    s = torch.einsum("qhd,lhd->hql", q.float(), kr.float()) * 0.088
    s = s.masked_fill(torch.ones(n, n, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.float(), s.logsumexp(-1), atol=2e-2, rtol=2e-2)
    ref = torch.einsum("hql,lhd->hqd", s.softmax(-1), vr.float())
    torch.testing.assert_close(o[0].float(), ref, atol=2e-2, rtol=2e-2)
