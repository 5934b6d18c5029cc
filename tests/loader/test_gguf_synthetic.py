"""GGUF loader on small synthetic files: config, HF naming/layout, llama q/k un-permutation,
quant types, errors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from miniinfer.config import ModelConfig
from miniinfer.loader.gguf_loader import (
    SUPPORTED_GGML_TYPES, iter_gguf_weights, read_gguf_config)

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------------------------------
# helpers: tiny synthetic GGUF files
# ---------------------------------------------------------------------------------------

def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to llama q/k rows (written out independently)."""
    out = np.empty_like(w)
    hd = w.shape[0] // n_head
    for h in range(n_head):
        for half in range(2):
            for j in range(hd // 2):
                out[h * hd + 2 * j + half] = w[h * hd + half * hd // 2 + j]
    return out


def _write_gguf(path, arch: str, tensors: dict, *, hidden=16, heads=2, kv_heads=1, layers=1,
                ffn=32, key_length=None, vocab=None, tokens=None, extra=None, rope_theta=10000.0):
    """tensors: gguf name -> float32 array in HF shape, or (raw uint8 bytes array, qtype)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(rope_theta)
    if key_length is not None:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    if vocab is not None:
        w.add_vocab_size(vocab)
    if tokens is not None:
        w.add_token_list(tokens)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, (kind, value) in (extra or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _llama_tensors(hidden=16, heads=2, kv_heads=1, ffn=32, vocab=8, head_dim=None, output=False):
    hd = head_dim or hidden // heads
    hf = {
        "model.embed_tokens.weight": _rand(vocab, hidden),
        "model.layers.0.self_attn.q_proj.weight": _rand(heads * hd, hidden, seed=1),
        "model.layers.0.self_attn.k_proj.weight": _rand(kv_heads * hd, hidden, seed=2),
        "model.layers.0.self_attn.v_proj.weight": _rand(kv_heads * hd, hidden, seed=3),
        "model.layers.0.self_attn.o_proj.weight": _rand(hidden, heads * hd, seed=4),
        "model.layers.0.mlp.gate_proj.weight": _rand(ffn, hidden, seed=5),
        "model.layers.0.mlp.up_proj.weight": _rand(ffn, hidden, seed=6),
        "model.layers.0.mlp.down_proj.weight": _rand(hidden, ffn, seed=7),
        "model.layers.0.input_layernorm.weight": _rand(hidden, seed=8),
        "model.layers.0.post_attention_layernorm.weight": _rand(hidden, seed=9),
        "model.norm.weight": _rand(hidden, seed=10),
    }
    if output:
        hf["lm_head.weight"] = _rand(vocab, hidden, seed=11)
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for short, g in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                     ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                     ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                     ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "ffn_norm")):
        names[f"model.layers.0.{short}.weight"] = f"blk.0.{g}.weight"
    return hf, names


def test_llama_qk_unpermute(tmp_path):
    hf, names = _llama_tensors(heads=2, kv_heads=1, output=True)
    tensors = {}
    for n, w in hf.items():
        if n.endswith("q_proj.weight"):
            w = _llamacpp_permute(w, 2)
        elif n.endswith("k_proj.weight"):
            w = _llamacpp_permute(w, 1)
        tensors[names[n]] = w
    path = _write_gguf(tmp_path / "llama.gguf", "llama", tensors, vocab=8)
    cfg = read_gguf_config(path)
    assert cfg["tie_word_embeddings"] is False and cfg["head_dim"] == 8
    got = dict(iter_gguf_weights(path, progress=False))
    assert set(got) == set(hf)
    for n, w in hf.items():
        assert torch.equal(got[n], torch.from_numpy(w)), n


def test_unpermuted_q_gives_hf_rotary(tmp_path):
    """The loaded q_proj with HF's half-split RoPE equals llama.cpp's interleaved RoPE
    applied to the raw GGUF q_proj (up to the same row permutation)."""
    hidden, heads = 16, 2
    hd = hidden // heads
    hf, names = _llama_tensors(hidden=hidden, heads=heads, kv_heads=heads)
    w_gguf = _llamacpp_permute(hf["model.layers.0.self_attn.q_proj.weight"], heads)
    tensors = {names[n]: (w_gguf if n.endswith("q_proj.weight") else
                          _llamacpp_permute(w, heads) if n.endswith("k_proj.weight") else w)
               for n, w in hf.items()}
    path = _write_gguf(tmp_path / "rope.gguf", "llama", tensors, heads=heads, kv_heads=heads, vocab=8)
    q_w = dict(iter_gguf_weights(path, progress=False))["model.layers.0.self_attn.q_proj.weight"]

    x = torch.randn(hidden, dtype=torch.float64)
    pos = 5.0
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)
    # HF: rotate_half on [x1 | x2]
    q = (q_w.double() @ x).view(heads, hd)
    q1, q2 = q[:, : hd // 2], q[:, hd // 2:]
    hf_rot = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    # llama.cpp: rotate adjacent pairs (x0, x1), (x2, x3), ...
    g = (torch.from_numpy(w_gguf).double() @ x).view(heads, hd // 2, 2)
    a, b = g[..., 0], g[..., 1]
    cpp_rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    # de-interleave llama.cpp's output into HF's order
    cpp_as_hf = torch.cat([cpp_rot[..., 0], cpp_rot[..., 1]], dim=-1)
    torch.testing.assert_close(hf_rot, cpp_as_hf)


def test_qwen3_config_and_names(tmp_path):
    hidden, heads, kv, hd = 16, 2, 1, 12  # head_dim != hidden // heads
    hf, names = _llama_tensors(hidden=hidden, heads=heads, kv_heads=kv, head_dim=hd)
    tensors = {names[n]: w for n, w in hf.items()}
    tensors["blk.0.attn_q_norm.weight"] = _rand(hd, seed=20)
    tensors["blk.0.attn_k_norm.weight"] = _rand(hd, seed=21)
    tokens = [f"t{i}" for i in range(8)]
    path = _write_gguf(tmp_path / "qwen3.gguf", "qwen3", tensors, hidden=hidden, heads=heads,
                       kv_heads=kv, key_length=hd, tokens=tokens)
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["head_dim"] == 12
    assert cfg["vocab_size"] == 8  # from the token list: no qwen3.vocab_size key
    assert cfg["tie_word_embeddings"] is True
    assert ModelConfig.from_hf_dict(cfg).qk_norm
    got = dict(iter_gguf_weights(path, progress=False))
    assert torch.equal(got["model.layers.0.self_attn.q_norm.weight"],
                       torch.from_numpy(tensors["blk.0.attn_q_norm.weight"]))
    assert "model.layers.0.self_attn.k_norm.weight" in got
    # qwen GGUFs are not permuted
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                       torch.from_numpy(hf["model.layers.0.self_attn.q_proj.weight"]))


def test_qwen2_bias(tmp_path):
    hf, names = _llama_tensors(heads=2, kv_heads=1)
    tensors = {names[n]: w for n, w in hf.items()}
    for p, rows in (("q", 16), ("k", 8), ("v", 8)):
        tensors[f"blk.0.attn_{p}.bias"] = _rand(rows, seed=30)
    path = _write_gguf(tmp_path / "qwen2.gguf", "qwen2", tensors, vocab=8)
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["attention_bias"] is True
    got = dict(iter_gguf_weights(path, progress=False))
    for p in "qkv":
        assert torch.equal(got[f"model.layers.0.self_attn.{p}_proj.bias"],
                           torch.from_numpy(tensors[f"blk.0.attn_{p}.bias"]))


_QUANTIZABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
_K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", _QUANTIZABLE + _K_QUANTS, ids=lambda q: q.name)
def test_quant_types(tmp_path, qtype):
    out_f, in_f = 4, 256  # K-quants need rows of 256
    hf, names = _llama_tensors()
    tensors = {names[n]: w for n, w in hf.items()}
    ref = _rand(out_f, in_f, seed=40)
    if qtype in _QUANTIZABLE:
        raw = gguf.quants.quantize(ref, qtype)
    else:  # gguf-py can't quantize K-quants: use random blocks with sane fp16 scales
        _, type_size = gguf.constants.GGML_QUANT_SIZES[qtype]
        raw = np.random.default_rng(1).integers(0, 256, (out_f, type_size), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        for lo in (0, 2, type_size - 4, type_size - 2):  # d/dmin sit first or last by type
            raw[:, lo:lo + 2] = scale
    tensors["blk.0.ffn_up.weight"] = (raw, qtype)
    path = _write_gguf(tmp_path / f"{qtype.name}.gguf", "qwen2", tensors, vocab=8)
    got = dict(iter_gguf_weights(path, progress=False))["model.layers.0.mlp.up_proj.weight"]
    assert got.shape == (out_f, in_f) and got.dtype == torch.float32
    expect = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(out_f, in_f))
    torch.testing.assert_close(got, expect, rtol=0, atol=0, equal_nan=True)
    if qtype in _QUANTIZABLE:
        tol = {Q.F16: 1e-3, Q.BF16: 2e-2, Q.Q8_0: 5e-2}.get(qtype, 0.5)
        torch.testing.assert_close(got, torch.from_numpy(ref), rtol=0, atol=tol)


def test_unsupported_quant_type(tmp_path):
    hf, names = _llama_tensors()
    tensors = {names[n]: w for n, w in hf.items()}
    tensors["blk.0.ffn_up.weight"] = np.zeros((32, 16), dtype=np.int32)  # -> GGML I32
    path = _write_gguf(tmp_path / "bad.gguf", "llama", tensors, vocab=8)
    read_gguf_config(path)  # metadata is fine
    with pytest.raises(ValueError) as ei:
        list(iter_gguf_weights(path, progress=False))
    msg = str(ei.value)
    assert "blk.0.ffn_up.weight" in msg and "I32" in msg
    assert all(t in msg for t in ("Q4_K", "Q8_0", "F16"))


def test_unsupported_ternary_type_fails_before_loading(tmp_path):
    hf, names = _llama_tensors()
    tensors = {names[n]: w for n, w in hf.items()}
    tensors["blk.0.ffn_down.weight"] = (gguf.quants.quantize(_rand(4, 256), Q.TQ2_0), Q.TQ2_0)
    path = _write_gguf(tmp_path / "tq.gguf", "llama", tensors, vocab=8)
    it = iter_gguf_weights(path, progress=False)
    with pytest.raises(ValueError, match="TQ2_0"):
        next(it)  # checked up front, before the first tensor is yielded
    assert "TQ2_0" not in SUPPORTED_GGML_TYPES


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": _rand(8, 16)}, vocab=8)
    for fn in (read_gguf_config, lambda p: list(iter_gguf_weights(p, progress=False))):
        with pytest.raises(ValueError) as ei:
            fn(path)
        msg = str(ei.value)
        assert "gpt2" in msg and "llama" in msg and "qwen2" in msg and "qwen3" in msg


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_config(str(p))
    with pytest.raises(FileNotFoundError):
        read_gguf_config(str(tmp_path / "missing.gguf"))


def test_truncated_file(tmp_path):
    hf, names = _llama_tensors()
    path = _write_gguf(tmp_path / "t.gguf", "llama", {names[n]: w for n, w in hf.items()}, vocab=8)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-64])
    with pytest.raises(ValueError, match="past the end"):
        list(iter_gguf_weights(path, progress=False))


def test_yarn_rope_scaling(tmp_path):
    hf, names = _llama_tensors()
    path = _write_gguf(tmp_path / "yarn.gguf", "qwen2", {names[n]: w for n, w in hf.items()}, vocab=8,
                       extra={"qwen2.rope.scaling.type": ("string", "yarn"),
                              "qwen2.rope.scaling.factor": ("float32", 4.0),
                              "qwen2.rope.scaling.original_context_length": ("uint32", 32768)})
    rs = read_gguf_config(path)["rope_scaling"]
    assert rs == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert ModelConfig.from_hf_dict(read_gguf_config(path)).rope_scaling["rope_type"] == "yarn"


def test_llama3_rope_freqs(tmp_path):
    # rope_freqs as llama.cpp's converter writes it for Llama 3.1 (factor 8, 1/4, 8192)
    hd, theta = 8, 500000.0
    freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wl = 2 * np.pi / freqs
    factors = []
    for w in wl:
        if w < 8192 / 4:
            factors.append(1.0)
        elif w > 8192 / 1:
            factors.append(8.0)
        else:
            s = (8192 / w - 1) / (4 - 1)
            factors.append(1 / ((1 - s) / 8 + s))
    hf, names = _llama_tensors()
    tensors = {names[n]: w for n, w in hf.items()}
    tensors["rope_freqs.weight"] = np.array(factors, dtype=np.float32)
    path = _write_gguf(tmp_path / "l3.gguf", "llama", tensors, vocab=8,
                       rope_theta=theta)
    cfg = read_gguf_config(path)
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in {n for n, _ in iter_gguf_weights(path, progress=False)}


def test_progress_bar(tmp_path, capsys):
    hf, names = _llama_tensors()
    path = _write_gguf(tmp_path / "p.gguf", "llama", {names[n]: w for n, w in hf.items()}, vocab=8)
    list(iter_gguf_weights(path, progress=False))
    assert capsys.readouterr().err == ""
    list(iter_gguf_weights(path, progress=True))
    assert "p.gguf" in capsys.readouterr().err
