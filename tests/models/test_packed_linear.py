"""oneDNN-packed CPU linears: same results as nn.Linear, swapped in only for CPU fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from miniinfer.models.packed_linear import PackedLinear, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48)])
def test_packed_equals_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    packed = PackedLinear.from_linear(lin)
    x = torch.randn(*shape)
    y = packed(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32 and not y.is_mkldnn
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)


def test_pack_linears_swaps_every_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    x = torch.randn(3, 8)
    ref = model(x)
    assert pack_linears(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_only_cpu_fp32():
    assert packing_available(torch.device("cpu"), torch.float32)
    assert not packing_available(torch.device("cpu"), torch.bfloat16)
    assert not packing_available(torch.device("cuda"), torch.float32)


def test_engine_packs_on_cpu_fp32_and_can_opt_out(tiny_llm):
    on, off = tiny_llm("qwen2"), tiny_llm("qwen2", cpu_packed_weights=False)  # qwen2: biased qkv
    assert isinstance(on.engine.runner.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(off.engine.runner.model.layers[0].self_attn.qkv_proj, nn.Linear)
    assert isinstance(tiny_llm("qwen2", dtype="bfloat16").engine.runner.model.layers[0].mlp.down_proj,
                      nn.Linear)
    ids = list(range(5, 45))
    a, b = on.engine.runner.forward_logits(ids), off.engine.runner.forward_logits(ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_smollm2_gguf_weights_stay_quantized_and_match_dequantized(smol_llm):
    """The embedded GGUF's projections (Q4_1) and tied LM head (Q8_0) run on the C kernels (so
    the HF parity tests on it exercise them); its logits match the dequantized-weights engine."""
    from miniinfer import LLM
    from miniinfer.kernels import cpu_kernels
    from miniinfer.models.packed_linear import QuantizedLinear
    if not cpu_kernels.available():
        pytest.skip("the C kernels did not build (no gcc/cc? see the warning logged)")
    model = smol_llm.engine.runner.model
    layer = model.layers[3]
    for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(mod, QuantizedLinear) and mod.fmt == "Q4_1"
    assert layer.mlp.gate_up_proj.packed.numel() == 2 * 1536 * 576 * 20 // 32  # 0.625 bytes a weight
    assert isinstance(model.packed_lm_head, QuantizedLinear) and model.packed_lm_head.fmt == "Q8_0"
    dense = LLM(None, dtype="float32", max_model_len=2048, progress=False, cpu_gguf_kernels=False)
    assert isinstance(dense.engine.runner.model.layers[3].mlp.down_proj, PackedLinear)
    assert isinstance(dense.engine.runner.model.packed_lm_head, PackedLinear)
    ids = list(range(100, 160))
    a, b = smol_llm.engine.runner.forward_logits(ids), dense.engine.runner.forward_logits(ids)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_quantized_linear_on_every_kernel_path(isa, fmt):
    """QuantizedLinear (bias, leading dims) equals nn.Linear over the dequantized weights on each
    kernel implementation this CPU runs; the packed weights are the same for all of them."""
    import numpy as np
    from miniinfer.kernels import cpu_kernels
    from miniinfer.models.packed_linear import QuantizedLinear
    if not cpu_kernels.available():
        pytest.skip("the C kernels did not build (no gcc/cc? see the warning logged)")
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {cpu_kernels.supported_isas()})")
    rng = np.random.default_rng(0)
    n, k, width = 48, 96, cpu_kernels.BLOCK_BYTES[fmt]
    raw = rng.integers(0, 256, (n, k // 32, width), dtype=np.uint8)
    raw[:, :, 0:2] = rng.uniform(-0.02, 0.02, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    if fmt == "Q4_1":
        raw[:, :, 2:4] = rng.uniform(-0.1, 0.1, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks = torch.from_numpy(raw.reshape(n, -1))
    bias = torch.randn(n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(cpu_kernels.dequantize(blocks, k, fmt))
        lin.bias.copy_(bias)
    q = QuantizedLinear(blocks, k, bias, fmt)
    x = torch.randn(2, 3, k)
    with cpu_kernels.use_isa(isa):
        y = q(x)
    assert y.shape == (2, 3, n)
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)


def test_engine_without_the_c_kernels(monkeypatch):
    """Where the C kernels can't build (no C compiler), the GGUF model runs dequantized
    on oneDNN-packed weights with the torch attention backend, and still answers right."""
    from miniinfer import LLM, SamplingParams
    from miniinfer.kernels import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "_library", lambda: None)
    llm = LLM(None, dtype="float32", max_model_len=512, progress=False)
    assert llm.engine.runner.backend.name == "torch"
    assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj, PackedLinear)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
