"""RoPE, RMSNorm, SiLU-and-mul and KV-store kernels vs their torch references."""
import pytest
import torch

from _kernels_testlib import assert_close, cos_sin_cache

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- rope
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D,rot", [(4, 2, 64, 64), (3, 1, 128, 64), (2, 2, 32, 32)])
def test_rope_on_fused_qkv_views(device, dtype, H, Hkv, D, rot):
    from miniinfer.kernels.rope import apply_rope_, apply_rope_ref

    T = 7
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device).to(dtype)
    orig = qkv.clone()
    q = qkv[:, : H * D].view(T, H, D)  # strided views, like the model's fused projection
    k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
    cache = cos_sin_cache(64, rot, device)
    positions = torch.tensor([0, 1, 5, 63, 2, 2, 40], dtype=torch.int64, device=device)
    q_ref, k_ref = apply_rope_ref(positions, q.clone(), k.clone(), cache, rot)
    apply_rope_(positions, q, k, cache, rot)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    # v untouched, dims past rot_dim untouched
    assert torch.equal(qkv[:, (H + Hkv) * D:], orig[:, (H + Hkv) * D:])
    if rot < D:
        assert torch.equal(q[..., rot:], orig[:, : H * D].view(T, H, D)[..., rot:])
    # position 0 is the identity
    assert_close(q[0], orig[0, : H * D].view(H, D))


def test_rope_ref_matches_rotate_half(device):
    from miniinfer.kernels.rope import apply_rope_ref

    T, H, D = 5, 2, 64
    q = torch.randn(T, H, D, device=device)
    pos = torch.arange(T, device=device) * 3
    cache = cos_sin_cache(32, D, device)
    cos, sin = cache[pos, : D // 2].repeat(1, 2)[:, None], cache[pos, D // 2:].repeat(1, 2)[:, None]
    rotate_half = torch.cat([-q[..., D // 2:], q[..., : D // 2]], dim=-1)
    expected = q * cos + rotate_half * sin
    got, _ = apply_rope_ref(pos, q, q[:, :1], cache, D)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- rms norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1000, 2048])
def test_rms_norm(device, dtype, N):
    from miniinfer.kernels.norm import rms_norm, rms_norm_ref

    x_big = torch.randn(6, N + 24, device=device).to(dtype)
    x = x_big[:, :N]  # strided rows
    w = (torch.rand(N, device=device) + 0.5).to(dtype)
    out = rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_in_place(device, dtype):
    """Qwen3 QK-norm: normalise each head of a strided q view of a fused qkv, in place."""
    from miniinfer.kernels.norm import rms_norm, rms_norm_ref

    T, H, Hkv, D = 5, 4, 2, 128
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device).to(dtype)
    orig = qkv.clone()
    q = qkv[:, : H * D].view(T, H, D)
    w = (torch.rand(D, device=device) + 0.5).to(dtype)
    expected = rms_norm_ref(q.reshape(T * H, D), w, 1e-6).view(T, H, D)
    res = rms_norm(q, w, 1e-6, out=q)
    assert res is q
    assert_close(q, expected)
    assert torch.equal(qkv[:, H * D:], orig[:, H * D:])
    # a contiguous [T*H, D] view gives the same result
    out2 = rms_norm(orig[:, : H * D].reshape(T * H, D), w, 1e-6)
    assert_close(out2.view(T, H, D), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, dtype):
    from miniinfer.kernels.norm import fused_add_rms_norm_, fused_add_rms_norm_ref

    T, N = 9, 768
    x = torch.randn(T, N, device=device).to(dtype)
    r = torch.randn(T, N, device=device).to(dtype)
    w = (torch.rand(N, device=device) + 0.5).to(dtype)
    x_ref, r_ref = fused_add_rms_norm_ref(x, r, w, 1e-5)
    fused_add_rms_norm_(x, r, w, 1e-5)
    assert_close(r, r_ref)
    assert_close(x, x_ref)


# ---------------------------------------------------------------- silu and mul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("I", [300, 2304])
def test_silu_and_mul(device, dtype, I):
    from miniinfer.kernels.activation import silu_and_mul, silu_and_mul_ref

    x_big = torch.randn(4, 2 * I + 8, device=device).to(dtype) * 3
    x = x_big[:, : 2 * I]
    out = silu_and_mul(x)
    assert out.shape == (4, I)
    assert_close(out, silu_and_mul_ref(x))
    ref32 = torch.nn.functional.silu(x[:, :I].float()) * x[:, I:].float()
    assert_close(out, ref32.to(dtype))


# ---------------------------------------------------------------- kv store
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv,D,bs", [(2, 64, 16), (1, 128, 32)])
def test_store_kv_cache(device, dtype, Hkv, D, bs):
    from miniinfer.kernels.kv_store import store_kv_cache, store_kv_cache_ref

    H, T, num_blocks = 2 * Hkv, 6, 5
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device).to(dtype)
    k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
    slots = torch.tensor([3, bs * 4 + bs - 1, -1, bs + 2, -1, 2 * bs], dtype=torch.int64, device=device)
    kc = torch.randn(num_blocks, bs, Hkv, D, device=device).to(dtype)
    vc = torch.randn(num_blocks, bs, Hkv, D, device=device).to(dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_cache(k, v, kc, vc, slots)
    store_kv_cache_ref(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.equal(kc[4, bs - 1], k[1]) and torch.equal(vc[1, 2], v[3])
