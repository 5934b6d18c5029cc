"""RoPE fused with the paged KV-cache store (``kernels/rope_kv_store.py``) vs ``apply_rope_`` +
``store_kv_cache``, the Triton backend's ``forward_with_rope`` vs ``apply_rope_`` + ``forward``,
and (GPU only) bit-exactness of both fused decode paths (this one and the GEMV's SiLU-and-mul
prologue) on Qwen2-7B shapes in bf16.

    .venv/bin/python -m pytest -q tests/kernels/test_kernel_rope_kv_store.py
"""
import pytest
import torch

from _kernels_testlib import assert_close, cos_sin_cache

HAS_CUDA = torch.cuda.is_available()


def _inputs(T, H, Hkv, D, dtype, device, num_blocks=6, bs=4, max_pos=64):
    """qkv [T, (H + 2 Hkv) D] with q/k/v column views, NaN caches, positions, slots (some -1)."""
    g = torch.Generator().manual_seed(T * 131 + H)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(device=device, dtype=dtype)
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
    caches = [torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    positions = torch.randint(0, max_pos, (T,), generator=g).to(device)
    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[torch.arange(T) % 3 == 1] = -1  # padded rows: rotated, never stored
    return qkv, q, k, v, caches, positions, slots.to(device)


def _unfused(positions, q, k, v, cs, rot, kc, vc, slots):
    from miniinfer.kernels.kv_store import store_kv_cache
    from miniinfer.kernels.rope import apply_rope_

    apply_rope_(positions, q, k, cs, rot)
    store_kv_cache(k, v, kc, vc, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,Hkv,D,rot", [(1, 4, 2, 64, 64), (5, 6, 2, 32, 32), (7, 3, 1, 128, 64),
                                           (3, 5, 5, 48, 48), (40, 4, 1, 32, 32)])
def test_rope_store_matches_unfused(device, dtype, T, H, Hkv, D, rot):
    """GQA / MHA, partial rotary (rot < D) and a non-power-of-two head dim, a prefill-sized T:
    q, k, v (the whole qkv buffer) and both caches equal the two-kernel path exactly."""
    from miniinfer.kernels.rope_kv_store import rope_store_kv_cache_

    cs = cos_sin_cache(64, rot, device)
    bs = 4 if T < 20 else 16
    qkv, q, k, v, (kc, vc), positions, slots = _inputs(T, H, Hkv, D, dtype, device, bs=bs)
    qkv_u, q_u, k_u, v_u, (kc_u, vc_u), _, _ = _inputs(T, H, Hkv, D, dtype, device, bs=bs)
    _unfused(positions, q_u, k_u, v_u, cs, rot, kc_u, vc_u, slots)
    rope_store_kv_cache_(positions, q, k, v, cs, rot, kc, vc, slots)
    assert torch.equal(qkv, qkv_u)
    assert torch.equal(kc.isnan(), kc_u.isnan()) and torch.equal(vc.isnan(), vc_u.isnan())
    assert torch.equal(kc.nan_to_num(), kc_u.nan_to_num()) and torch.equal(vc.nan_to_num(), vc_u.nan_to_num())
    live = slots >= 0  # exactly the live tokens were written
    assert (~kc.isnan()).sum() == live.sum() * Hkv * D
    s = slots[live]
    assert torch.equal(kc[s // bs, s % bs], k[live]) and torch.equal(vc[s // bs, s % bs], v[live])


def test_rope_store_rejects_fp8_and_bad_shapes(device):
    from miniinfer.kernels.rope_kv_store import rope_store_kv_cache_

    _, q, k, v, (kc, vc), positions, slots = _inputs(3, 4, 2, 32, torch.float32, device)
    cs = cos_sin_cache(64, 32, device)
    with pytest.raises(AssertionError):
        rope_store_kv_cache_(positions, q, k, v, cs, 32, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn),
                             slots)
    with pytest.raises(AssertionError):
        rope_store_kv_cache_(positions, q, k, v[:, :1], cs, 32, kc, vc, slots)  # v heads mismatch
    with pytest.raises(AssertionError):
        rope_store_kv_cache_(positions, q, k, v, cs, 34, kc, vc, slots)  # rot_dim > D


def _backend_step(device, dtype, prefix, qlens, num_decodes, H, Hkv, D, bs):
    """A mixed decode + extend step from the backend tests (fresh random data each call with
    the same seed), and its q/k/v as column views of one qkv buffer."""
    from test_kernel_triton_backend import _step

    torch.manual_seed(0)
    kv, q, k, v, meta, _ = _step(prefix, qlens, num_decodes, H, Hkv, D, bs, dtype, device)
    T = q.shape[0]
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=1)
    views = (qkv[:, :H * D].view(T, H, D), qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D),
             qkv[:, (H + Hkv) * D:].view(T, Hkv, D))
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, qlens)]).to(device)
    return kv, qkv, views, meta, positions


def _backend_pair(device, dtype, shape, fp8=False):
    """(fused, unfused) outputs, qkv buffers and caches of ``forward_with_rope`` vs
    ``apply_rope_`` + ``forward`` on the same step."""
    from miniinfer.attention import get_backend
    from miniinfer.kernels.rope import apply_rope_

    prefix, qlens, nd, H, Hkv, D, bs = shape
    cs = cos_sin_cache(max(prefix) + max(qlens) + 1, D, device)
    res = []
    for fused in (True, False):
        kv, qkv, (q, k, v), meta, positions = _backend_step(device, dtype, prefix, qlens, nd, H, Hkv, D, bs)
        kc, vc = (kv.k_cache.to(torch.float8_e4m3fn), kv.v_cache.to(torch.float8_e4m3fn)) if fp8 else (
            kv.k_cache, kv.v_cache)
        backend = get_backend("triton", "cuda")
        if fused:
            out = backend.forward_with_rope(positions, cs, D, q, k, v, kc, vc, meta, D ** -0.5)
        else:
            apply_rope_(positions, q, k, cs, D)
            out = backend.forward(q, k, v, kc, vc, meta, D ** -0.5)
        res.append((out, qkv, kc, vc))
    return res


@pytest.mark.parametrize("shape", [([16, 40, 4, 0, 21], [1, 1, 1, 20, 5], 3, 6, 2, 64, 16),
                                   ([7, 30], [1, 1], 2, 4, 1, 32, 16)])
def test_backend_forward_with_rope_matches_unfused(device, shape):
    """Mixed decode + prefill/extend step (fp32): same output, q/k/v buffer and caches."""
    (out, qkv, kc, vc), (out_u, qkv_u, kc_u, vc_u) = _backend_pair(device, torch.float32, shape)
    assert torch.equal(qkv, qkv_u)
    assert torch.equal(kc.nan_to_num(), kc_u.nan_to_num()) and torch.equal(vc.nan_to_num(), vc_u.nan_to_num())
    assert torch.equal(out, out_u)


def test_backend_forward_with_rope_fp8_cache_unfused_path(device):
    """FP8 cache: forward_with_rope takes apply_rope_ + the quantizing store (same bytes)."""
    shape = ([9, 3], [1, 4], 1, 4, 2, 32, 16)
    (out, qkv, kc, vc), (out_u, qkv_u, kc_u, vc_u) = _backend_pair(device, torch.float32, shape, fp8=True)
    assert torch.equal(qkv, qkv_u)
    assert torch.equal(kc.view(torch.uint8), kc_u.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc_u.view(torch.uint8))
    assert_close(out, out_u)


# ---------------------------------------------------------------- GPU: bit-exact, Qwen2-7B
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 2, 7, 300])
def test_gpu_rope_store_bitexact_qwen2_7b(T):
    from miniinfer.kernels.rope_kv_store import rope_store_kv_cache_

    H, Hkv, D = 28, 4, 128
    cs = cos_sin_cache(4096, D, "cuda", base=1e6)
    args = _inputs(T, H, Hkv, D, torch.bfloat16, "cuda", num_blocks=64, bs=16, max_pos=4096)
    ref = _inputs(T, H, Hkv, D, torch.bfloat16, "cuda", num_blocks=64, bs=16, max_pos=4096)
    qkv, q, k, v, (kc, vc), positions, slots = args
    qkv_u, q_u, k_u, v_u, (kc_u, vc_u), _, _ = ref
    _unfused(positions, q_u, k_u, v_u, cs, D, kc_u, vc_u, slots)
    rope_store_kv_cache_(positions, q, k, v, cs, D, kc, vc, slots)
    torch.cuda.synchronize()
    assert torch.equal(qkv, qkv_u)
    assert torch.equal(kc.view(torch.int16), kc_u.view(torch.int16))
    assert torch.equal(vc.view(torch.int16), vc_u.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_backend_forward_with_rope_bitexact_bf16():
    shape = ([4000, 1500, 2, 777], [1, 1, 1, 300], 3, 28, 4, 128, 16)
    (out, qkv, kc, vc), (out_u, qkv_u, kc_u, vc_u) = _backend_pair("cuda", torch.bfloat16, shape)
    assert torch.equal(qkv, qkv_u)
    assert torch.equal(kc.nan_to_num(), kc_u.nan_to_num()) and torch.equal(vc.nan_to_num(), vc_u.nan_to_num())
    assert torch.equal(out, out_u)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 2])
def test_gpu_gemv_silu_mul_bitexact_qwen2_7b(M):
    """The down projection with the SiLU-and-mul prologue == silu_and_mul kernel + GEMV, bit
    for bit (TUNED config of (3584, 18944)); through ``linear_silu_mul`` too."""
    from miniinfer.kernels.activation import silu_and_mul
    from miniinfer.kernels.gemv import gemv
    from miniinfer.models.linear import linear, linear_silu_mul

    I, N = 18944, 3584
    gate_up = (2 * torch.randn(M, 2 * I, device="cuda")).to(torch.bfloat16)
    w = (torch.randn(N, I, device="cuda") / I ** 0.5).to(torch.bfloat16)
    fused = gemv(gate_up, w, act="silu_mul")
    unfused = gemv(silu_and_mul(gate_up), w)
    assert torch.equal(fused, unfused)
    assert torch.equal(linear_silu_mul(gate_up, w), linear(silu_and_mul(gate_up), w))


# ---------------------------------------------------------------- decoder call sites
def _tiny_qwen2(device, dtype):
    from miniinfer.attention import get_backend
    from miniinfer.config import ModelConfig
    from miniinfer.models.decoder import DecoderForCausalLM

    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=50, hidden_size=64, intermediate_size=80,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=True, attention_bias=True, qk_norm=False)
    torch.manual_seed(3)
    model = DecoderForCausalLM(cfg, get_backend("triton", "cuda"), 64, device).to(device=device, dtype=dtype)
    model.cos_sin_cache = model.cos_sin_cache.float()
    for layer in model.layers:
        layer.self_attn.cos_sin_cache = model.cos_sin_cache
        layer.self_attn.k_cache = torch.zeros(4, 8, 2, 16, dtype=dtype, device=device)
        layer.self_attn.v_cache = torch.zeros(4, 8, 2, 16, dtype=dtype, device=device)
    return model


def _run_prefill_then_decode(model, device):
    """A 5-token prefill then a 1-token decode of one sequence: (hidden of each step, caches)."""
    from miniinfer.attention.metadata import AttentionMetadata, forward_context

    i32 = dict(dtype=torch.int32, device=device)
    bt = torch.tensor([[2, 0]], **i32)
    ids = torch.tensor([3, 14, 15, 9, 2, 6], device=device)
    outs = []
    for start, end in ((0, 5), (5, 6)):
        n = end - start
        meta = AttentionMetadata(
            num_decodes=int(n == 1), num_decode_tokens=int(n == 1), query_start_loc=torch.tensor([0, n], **i32),
            seq_lens=torch.tensor([end], **i32), block_tables=bt,
            slot_mapping=torch.arange(16 + start, 16 + end, device=device), max_query_len=n, max_seq_len=end,
            query_start_loc_cpu=[0, n], seq_lens_cpu=[end])
        with forward_context(meta), torch.no_grad():
            outs.append(model(ids[start:end], torch.arange(start, end, device=device)))
    return outs, [c for layer in model.layers for c in (layer.self_attn.k_cache, layer.self_attn.v_cache)]


def test_decoder_takes_fused_rope_store(monkeypatch, device):
    """Qwen2 decoder on the Triton backend with the Triton rope path (rope tables None, as on
    CUDA): ``forward_with_rope`` is called and gives what the unfused call site gives (the
    decoder's RoPE + ``forward``; exact on CUDA, torch/C-vs-kernel RoPE ulps on CPU)."""
    from miniinfer.attention.triton_backend import TritonAttentionBackend
    from miniinfer.models import decoder, ops

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    calls = []
    real = TritonAttentionBackend.forward_with_rope
    with monkeypatch.context() as m:
        m.setattr(decoder.ops, "rope_tables", lambda positions, cache: None)  # already so on CUDA
        m.setattr(TritonAttentionBackend, "forward_with_rope", lambda *a: calls.append(1) or real(*a))
        fused, fused_caches = _run_prefill_then_decode(_tiny_qwen2(device, dtype), device)
    assert len(calls) == 4  # 2 steps x 2 layers
    monkeypatch.delattr(TritonAttentionBackend, "forward_with_rope")
    if HAS_CUDA:  # the unfused MLP too: silu_and_mul kernel, then the GEMV
        monkeypatch.setattr(decoder, "silu_mul_linear", lambda g, proj: proj(ops.silu_and_mul(g)))
    ref, ref_caches = _run_prefill_then_decode(_tiny_qwen2(device, dtype), device)
    for a, b in zip(fused + fused_caches, ref + ref_caches):
        if HAS_CUDA:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
