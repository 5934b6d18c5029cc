"""sm_90+: programmatic dependent launch (``kernels/pdl.py``) must not change a single bit.

One Qwen2-7B-shaped decode layer at batch 1 (add + RMSNorm, qkv GEMV with bias, RoPE + KV
store, split-KV decode attention, o GEMV split-K, add + RMSNorm, gate_up GEMV, SiLU-and-mul,
down GEMV), ten layers deep over distinct weights, captured in a CUDA graph with PDL on and
with it off. Every replay takes new inputs; a kernel reading its
input before the previous kernel finished writing it would show as a mismatch."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                 reason="needs an sm_90+ CUDA GPU")]

HIDDEN, INTER, H, HKV, D, LAYERS, BLOCK = 3584, 18944, 28, 4, 128, 10, 16


def _weights(dev):
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=dev) * 0.02).bfloat16()
    return [dict(qkv=w((H + 2 * HKV) * D, HIDDEN), qkv_b=w((H + 2 * HKV) * D), o=w(HIDDEN, H * D),
                 gate_up=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER), n1=1 + w(HIDDEN), n2=1 + w(HIDDEN))
            for _ in range(LAYERS)]


def _step(state, layers, caches):
    from miniinfer.kernels.decode_attention import paged_decode_attention
    from miniinfer.kernels.gemv import GemvConfig, gemv
    from miniinfer.kernels.activation import silu_and_mul
    from miniinfer.kernels.norm import fused_add_rms_norm_
    from miniinfer.kernels.rope_kv_store import rope_store_kv_cache_
    x, res = state["x"], state["res"]
    for lw, (kc, vc) in zip(layers, caches):
        fused_add_rms_norm_(x, res, lw["n1"], 1e-6)
        qkv = gemv(x, lw["qkv"], lw["qkv_b"])
        q = qkv[:, :H * D].view(1, H, D)
        k = qkv[:, H * D:(H + HKV) * D].view(1, HKV, D)
        v = qkv[:, (H + HKV) * D:].view(1, HKV, D)
        rope_store_kv_cache_(state["pos"], q, k, v, state["cos_sin"], D, kc, vc, state["slot"])
        attn = paged_decode_attention(q, kc, vc, state["bt"], state["sl"], D ** -0.5, max_seq_len=4096,
                                      num_splits=4)
        x = gemv(attn.view(1, H * D), lw["o"], config=GemvConfig(block_n=4, block_k=512, split_k=4))
        fused_add_rms_norm_(x, res, lw["n2"], 1e-6)
        x = gemv(silu_and_mul(gemv(x, lw["gate_up"])), lw["down"])
    state["out"].copy_(x)


def _run(pdl: bool, replays: int = 50) -> torch.Tensor:
    from miniinfer.kernels import _common
    dev = torch.device("cuda")
    _common.PDL = pdl
    try:
        layers = _weights(dev)
        ctx = 700
        caches = [(torch.zeros(64, BLOCK, HKV, D, dtype=torch.bfloat16, device=dev),
                   torch.zeros(64, BLOCK, HKV, D, dtype=torch.bfloat16, device=dev)) for _ in layers]
        g = torch.Generator(device=dev).manual_seed(1)
        for kc, vc in caches:  # a context of ctx - 1 cached tokens
            kc.view(-1, HKV, D)[:ctx].normal_(generator=g)
            vc.view(-1, HKV, D)[:ctx].normal_(generator=g)
        pos = torch.full((1,), ctx - 1, dtype=torch.int64, device=dev)
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
        ang = torch.arange(4096, device=dev).float()[:, None] * inv[None, :]
        state = dict(x=torch.empty(1, HIDDEN, dtype=torch.bfloat16, device=dev),
                     res=torch.empty(1, HIDDEN, dtype=torch.bfloat16, device=dev),
                     out=torch.empty(1, HIDDEN, dtype=torch.bfloat16, device=dev),
                     pos=pos, slot=pos.clone(), cos_sin=torch.cat((ang.cos(), ang.sin()), 1),
                     bt=torch.arange(64, dtype=torch.int32, device=dev)[None, :],
                     sl=torch.full((1,), ctx, dtype=torch.int32, device=dev))
        inputs = torch.randn(replays, 2, HIDDEN, generator=g, device=dev).bfloat16()
        state["x"].copy_(inputs[0, 0:1])
        state["res"].copy_(inputs[0, 1:2])
        _step(state, layers, caches)  # compile / warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _step(state, layers, caches)
        outs = []
        for i in range(replays):
            state["x"].copy_(inputs[i, 0:1])
            state["res"].copy_(inputs[i, 1:2])
            graph.replay()
            outs.append(state["out"].clone())
        torch.cuda.synchronize()
        return torch.cat(outs)
    finally:
        _common.PDL = _common.os.environ.get("MINIINFER_PDL", "1") != "0"


def test_pdl_decode_chain_bit_identical_in_cuda_graph():
    on = _run(True)
    off = _run(False)
    assert torch.isfinite(off.float()).all()
    assert torch.equal(on, off), (on.float() - off.float()).abs().max()
    assert not torch.equal(off[0], off[1])  # the replays saw new inputs
