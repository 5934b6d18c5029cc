"""GGUF Q4_0 / Q4_K / Q6_K rows converted at load time to the kernels' Q4_1 / Q8_0
(loader/gguf_requant.py): compared with gguf-py's own dequantization, through
QuantizedLinear, and end to end on a tiny Llama GGUF."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from miniinfer.kernels import cpu_kernels
from miniinfer.loader import gguf_requant as R

Q = gguf.GGMLQuantizationType
# measured (module docstring): Q4_K <= 1.3e-3 of a row's max |w|, Q6_K <= 1/254
TOL_ROW = {"Q4_K": 2e-3, "Q6_K": 4.5e-3}
TOL_FRO = {"Q4_K": 1e-3, "Q6_K": 1e-2}

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.atleast_1d(np.asarray(x, np.float16)).view(np.uint8)


def _random_rows(qtype: Q, n: int, k: int, seed: int = 0, scale: float = 1e-3) -> np.ndarray:
    """Random blocks of ``qtype`` (any bit pattern) with sane fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    d = rng.uniform(0.1, 2.0, (n, k // block, 1)) * scale * rng.choice([-1, 1], (n, k // block, 1))
    if qtype == Q.Q4_0:
        raw[:, :, 0:2] = _f16_bytes(d)
    elif qtype == Q.Q4_K:
        raw[:, :, 0:2] = _f16_bytes(np.abs(d))
        raw[:, :, 2:4] = _f16_bytes(rng.uniform(0.1, 2.0, d.shape) * scale)
    elif qtype == Q.Q6_K:
        raw[:, :, 208:210] = _f16_bytes(np.abs(d))
    return raw.reshape(n, -1)


def _converted(qtype: Q, raw: np.ndarray, k: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(kernel format, our dequantization of the converted rows, gguf-py's of the original)."""
    fmt, rows = R.to_kernel_rows(qtype.name, raw)
    assert fmt == R.KERNEL_TARGET[qtype.name] and rows.dtype == np.uint8
    assert rows.shape == (raw.shape[0], k // 32 * cpu_kernels.BLOCK_BYTES[fmt])
    got = cpu_kernels.dequantize(torch.from_numpy(rows), k, fmt).numpy()
    ref = gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], k)
    return fmt, got, ref


def test_q4_0_exact():
    n, k = 32, 512
    rng = np.random.default_rng(1)
    raw = np.concatenate([
        gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), Q.Q4_0),
        _random_rows(Q.Q4_0, n, k, scale=1.0),
        _random_rows(Q.Q4_0, n, k, scale=1e-6),  # fp16 subnormal scales
        _random_rows(Q.Q4_0, n, k, scale=4000.0)])  # 8 d close to fp16's max
    fmt, got, ref = _converted(Q.Q4_0, raw, k)
    assert fmt == "Q4_1"
    np.testing.assert_array_equal(got, ref)


def test_q4_0_overflow_falls_back():
    raw = _random_rows(Q.Q4_0, 16, 64, scale=1.0)
    raw[3, 0:2] = _f16_bytes(np.float16(9000.0))  # -8 d overflows fp16
    assert R.q4_0_to_q4_1(raw) is None and R.to_kernel_rows("Q4_0", raw) is None


def test_q4_k_nibble_and_scale_order():
    """One super-block with q = position % 16, sc_j = j + 1, m_j = 2 j, d = 1, dmin = 0.5:
    exact (every product is an fp16), so this pins the layout."""
    q = (np.arange(256) % 16).astype(np.uint8).reshape(4, 2, 32)  # [chunk, nibble, byte]
    qs = q[:, 0] | (q[:, 1] << 4)
    sc, mn = np.arange(1, 9, dtype=np.uint8), 2 * np.arange(8, dtype=np.uint8)
    scales = np.zeros(12, np.uint8)  # get_scale_min_k4 packing, written out
    scales[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    scales[4:8] = mn[0:4] | ((mn[4:8] >> 4) << 6)
    scales[8:12] = (sc[4:8] & 15) | ((mn[4:8] & 15) << 4)
    raw = np.concatenate([_f16_bytes([1.0]), _f16_bytes([0.5]), scales, qs.reshape(-1)])[None]
    _, got, ref = _converted(Q.Q4_K, raw, 256)
    np.testing.assert_array_equal(got, ref)
    j = np.arange(256) // 32
    np.testing.assert_array_equal(ref[0], (j + 1) * (np.arange(256) % 16) - 0.5 * 2 * j)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("scale", [1e-3, 1e-6, 5.0])
def test_k_quants_within_tolerance(qtype, scale):
    n, k = 48, 1024
    raw = _random_rows(qtype, n, k, seed=2, scale=scale)
    _, got, ref = _converted(qtype, raw, k)
    row_max = np.abs(ref).max(axis=1)
    assert (np.abs(got - ref).max(axis=1) <= TOL_ROW[qtype.name] * row_max).all()
    assert np.linalg.norm(got - ref) <= TOL_FRO[qtype.name] * np.linalg.norm(ref)


def test_q6_k_equal_scales_exact():
    """Two sub-blocks with the same scale and ``d * sc`` an fp16: the Q8_0 block is exact."""
    raw = _random_rows(Q.Q6_K, 16, 512, seed=3)
    raw.reshape(16, 2, 210)[:, :, 192:208] = np.uint8(12)
    raw.reshape(16, 2, 210)[:, :, 208:210] = _f16_bytes([2.0 ** -10])
    _, got, ref = _converted(Q.Q6_K, raw, 512)
    np.testing.assert_array_equal(got, ref)


def test_q6_k_overflow_falls_back():
    raw = _random_rows(Q.Q6_K, 16, 256)
    raw[0, 208:210] = _f16_bytes([60000.0])
    raw[0, 192:208] = np.uint8(127)
    assert R.to_kernel_rows("Q6_K", raw) is None


def test_passthrough_and_unsupported():
    raw = np.random.default_rng(0).integers(0, 256, (16, 68), dtype=np.uint8)
    fmt, rows = R.to_kernel_rows("Q8_0", raw)
    assert fmt == "Q8_0" and np.array_equal(rows, raw) and rows is not raw
    assert R.to_kernel_rows("Q5_K", raw) is None


def test_chunked_rows_match():
    raw = _random_rows(Q.Q4_K, 2 * R._CHUNK_ROWS + 16, 256, seed=4)
    _, rows = R.to_kernel_rows("Q4_K", raw)
    np.testing.assert_array_equal(rows, R.q4_k_to_q4_1(raw))


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_quantized_linear_over_converted_rows(qtype):
    from miniinfer.models.packed_linear import QuantizedLinear
    n, k = 48, 512
    raw = _random_rows(qtype, n, k, seed=5)
    fmt, rows = R.to_kernel_rows(qtype.name, raw)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k)))
    q = QuantizedLinear(torch.from_numpy(rows), k, lin.bias, fmt)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    ref = lin(x).detach()
    tol = {Q.Q4_0: 1e-5, Q.Q4_K: 2e-3, Q.Q6_K: 1e-2}[qtype] * ref.abs().max().item()
    torch.testing.assert_close(q(x), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_q4_1_to_q8_0_within_1_over_254(scale):
    """Random Q4_1 blocks (normal fp16 d'): max error <= max |v| / 254 (+ fp16 rounding of
    d') in every block, against both our and gguf-py's dequantization of the Q4_1 rows."""
    n, k = 64, 1024
    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, (n, k // 32, 20), dtype=np.uint8)
    raw[:, :, 0:2] = _f16_bytes(rng.uniform(0.1, 2.0, (n, k // 32, 1)) * scale)
    raw[:, :, 2:4] = _f16_bytes(rng.uniform(-10.0, 10.0, (n, k // 32, 1)) * scale)
    raw = raw.reshape(n, -1)
    rows = R.q4_1_to_q8_0(raw)
    assert rows.dtype == np.uint8 and rows.shape == (n, k // 32 * 34)
    got = cpu_kernels.dequantize(torch.from_numpy(rows), k, "Q8_0").numpy().reshape(n, -1, 32)
    ref = cpu_kernels.dequantize(torch.from_numpy(raw), k, "Q4_1").numpy().reshape(n, -1, 32)
    np.testing.assert_array_equal(ref, gguf.quants.dequantize(raw, Q.Q4_1).reshape(n, -1, 32))
    rel = np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
    assert rel.max() <= (1 + 2 ** -10) / 254
    # chunked conversion == one pass
    big = np.concatenate([raw] * (R._CHUNK_ROWS // n + 1))
    np.testing.assert_array_equal(R.q4_1_to_q8_0(big), np.concatenate([rows] * (R._CHUNK_ROWS // n + 1)))


def test_q4_1_to_q8_0_subnormal_scale_and_zero_block():
    """Tiny blocks (subnormal fp16 d'): the next fp16 up is used rather than clipping; an
    all-zero block stays zero."""
    rng = np.random.default_rng(12)
    raw = rng.integers(0, 256, (16, 8, 20), dtype=np.uint8)
    raw[:, :, 0:2] = _f16_bytes(rng.uniform(0.1, 2.0, (16, 8, 1)) * 1e-6)
    raw[:, :, 2:4] = _f16_bytes(rng.uniform(-10.0, 10.0, (16, 8, 1)) * 1e-6)
    raw[0, 0, :] = 0
    raw = raw.reshape(16, -1)
    got = cpu_kernels.dequantize(torch.from_numpy(R.q4_1_to_q8_0(raw)), 256, "Q8_0").numpy()
    ref = cpu_kernels.dequantize(torch.from_numpy(raw), 256, "Q4_1").numpy()
    assert (got[0, :32] == 0).all()
    step = 2.0 ** -24  # fp16 subnormal spacing: d' is off max|v|/127 by at most one step
    amax = np.abs(ref.reshape(16, 8, 32)).max(axis=-1)
    err = np.abs(got - ref).reshape(16, 8, 32).max(axis=-1)
    assert (err <= (amax / 127 + step) / 2 * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------------
# end to end: a tiny Llama GGUF with Q4_0 / Q4_K / Q6_K projections
# ---------------------------------------------------------------------------------------

def _write_tiny_llama(path: str, vocab: int, kinds_override: dict | None = None) -> None:
    hidden, heads, kv, ffn, hd = 256, 4, 2, 512, 64
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(vocab + 10)  # never generated
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", _random_rows(Q.Q6_K, vocab, hidden, seed=8, scale=2e-4), raw_dtype=Q.Q6_K)
    shapes = {"attn_q": heads * hd, "attn_k": kv * hd, "attn_v": kv * hd, "attn_output": hidden,
              "ffn_gate": ffn, "ffn_up": ffn, "ffn_down": hidden}
    kinds = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q4_K, "attn_output": Q.Q4_0,
             "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, **(kinds_override or {})}
    for layer in range(2):
        for name, rows in shapes.items():
            cols = ffn if name == "ffn_down" else hidden
            qt = kinds[name]
            scale = {Q.Q4_0: 1e-2, Q.Q4_K: 2e-4, Q.Q6_K: 1e-4}[qt]
            raw = _random_rows(qt, rows, cols, seed=10 * layer + len(name), scale=scale)
            w.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=qt)
        w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@needs_kernels
@pytest.mark.parametrize("v_kind", [Q.Q4_K, Q.Q6_K], ids=["v_Q4_K", "v_Q6_K"])
def test_tiny_llama_gguf_stays_quantized(tmp_path, v_kind):
    """With a Q6_K attn_v next to Q4_K q/k (as in real Q4_K_M files) qkv_proj is all Q8_0."""
    from miniinfer import LLM, SamplingParams
    from miniinfer.models.packed_linear import QuantizedLinear
    from tests.helpers import TINY_VOCAB, write_tiny_tokenizer
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_llama(path, TINY_VOCAB, {"attn_v": v_kind})
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    kw = dict(tokenizer=tok, dtype="float32", progress=False, num_kv_blocks=16)
    quant, dense = LLM(path, **kw), LLM(path, cpu_gguf_kernels=False, **kw)
    model = quant.engine.runner.model
    for layer in model.layers:
        mods = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
                "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
        assert {k: (type(m), m.fmt) for k, m in mods.items()} == {
            "qkv": (QuantizedLinear, "Q4_1" if v_kind == Q.Q4_K else "Q8_0"), "o": (QuantizedLinear, "Q4_1"),
            "gate_up": (QuantizedLinear, "Q4_1"), "down": (QuantizedLinear, "Q8_0")}
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.fmt == "Q8_0"
    assert not any(isinstance(m, QuantizedLinear) for m in dense.engine.runner.model.modules())
    ids = [5, 17, 99, 230, 3, 42]
    a, b = quant.engine.runner.forward_logits(ids), dense.engine.runner.forward_logits(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * b.abs().max().item())
    sp = SamplingParams(temperature=0, max_tokens=8)
    got = quant.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids
    expect = dense.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == list(expect) and len(got) == 8
    from miniinfer.models.cpu_decode import CPUDecodePlan
    assert isinstance(model.cpu_decode, CPUDecodePlan)  # every projection quantized: the one-call CPU path ran
