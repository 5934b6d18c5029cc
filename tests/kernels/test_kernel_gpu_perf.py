"""GPU-only throughput reports for the attention kernels (run with ``-s`` to see numbers).

The assertions are deliberately loose (a regression tripwire, not a benchmark): decode
should stream the KV cache at a good fraction of HBM bandwidth."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _time_ms(fn, iters=20):
    from miniinfer.bench.common import device_ms
    return device_ms(fn, iters)


def _paged(B, ctx, Hkv, D, bs, dtype):
    blocks = -(-ctx // bs)
    num_blocks = B * blocks
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    bt = perm.view(B, blocks)
    kc = torch.randn(num_blocks, bs, Hkv, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    sl = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    return kc, vc, bt, sl


@pytest.mark.parametrize("B,ctx", [(1, 8192), (8, 4096), (64, 2048)])
@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (14, 2, 64)])
def test_decode_bandwidth(B, ctx, H, Hkv, D):
    from miniinfer.kernels.decode_attention import paged_decode_attention

    dtype = torch.bfloat16
    kc, vc, bt, sl = _paged(B, ctx, Hkv, D, 16, dtype)
    q = torch.randn(B, H, D, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    ms = _time_ms(lambda: paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, out=out, max_seq_len=ctx))
    gbps = 2 * B * ctx * Hkv * D * 2 / ms / 1e6
    print(f"\ndecode B={B} ctx={ctx} H={H} Hkv={Hkv} D={D}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s")
    if B * ctx * Hkv * D * 4 >= 64 << 20:  # big enough to be bandwidth bound
        assert gbps > 400


@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (14, 2, 64)])
def test_extend_throughput(H, Hkv, D):
    from miniinfer.kernels.extend_attention import paged_extend_attention

    dtype, B, n = torch.bfloat16, 4, 2048
    kc, vc, bt, sl = _paged(B, n, Hkv, D, 16, dtype)
    q = torch.randn(B * n, H, D, device="cuda", dtype=dtype)
    qsl = torch.arange(0, B * n + 1, n, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ms = _time_ms(lambda: paged_extend_attention(q, kc, vc, bt, qsl, sl, n, D ** -0.5, out=out), iters=10)
    tflops = 4 * B * H * D * n * n / 2 / ms / 1e9
    print(f"\nprefill B={B} n={n} H={H} Hkv={Hkv} D={D}: {ms:.2f} ms, {tflops:.0f} TFLOP/s (causal)")
    assert tflops > 20
