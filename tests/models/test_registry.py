"""The model registry: every family builds and loads; names resolve; unknown ones fail clearly;
a new family is one module plus one registry line."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

from miniinfer.attention import get_backend
from miniinfer.config import ModelConfig
from miniinfer.loader.model_loader import iter_safetensors
from miniinfer.models import registry
from miniinfer.models.decoder import DecoderForCausalLM
from miniinfer.models.registry import (GGUFSpec, ModelFamily, get_model_class, gguf_family, model_families,
                                       resolve_model_family, supported_architectures)
from miniinfer.parallel import TPGroup

_SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128)


def _build(mc: ModelConfig, tp: TPGroup = TPGroup()) -> DecoderForCausalLM:
    return get_model_class(mc.architecture)(mc, get_backend("torch", "cpu"), 64, "cpu", tp)


def _unfused_state(model: DecoderForCausalLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random HF-named tensors for ``model`` (fused parameters split back into their parts)."""
    gen = torch.Generator().manual_seed(seed)
    slices = model._fused_slices()
    state = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        packed = model.packed_modules_mapping.get(parts[-2])
        for part in packed or (None,):
            hf = name if part is None else ".".join(parts[:-2] + [part, parts[-1]])
            rows = p.shape[0] if part is None else slices[part][2]
            state["model." + hf] = torch.randn(rows, *p.shape[1:], generator=gen)
    return state


def test_registered_families():
    assert supported_architectures() == ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    assert [f.model_type for f in model_families()] == ["llama", "qwen2", "qwen3"]
    assert [f.gguf.architecture for f in model_families()] == ["llama", "qwen2", "qwen3"]
    llama, qwen2, qwen3 = model_families()
    assert llama.gguf.permuted_qk and not qwen2.gguf.permuted_qk and not qwen3.gguf.permuted_qk
    assert qwen2.attention_bias and not llama.attention_bias and not qwen3.attention_bias
    assert qwen3.qk_norm and not llama.qk_norm and not qwen2.qk_norm
    for family in model_families():
        cls = get_model_class(family.architecture)
        assert issubclass(cls, DecoderForCausalLM) and cls.__name__ == family.architecture
        assert cls.family is family


@pytest.mark.parametrize("family", model_families(), ids=lambda f: f.model_type)
def test_every_family_builds_and_loads(family):
    """Build each family from a config naming only its ``model_type``, load HF-named weights,
    and check every fused parameter holds its parts in ``packed_modules_mapping`` order."""
    mc = ModelConfig.from_hf_dict({"model_type": family.model_type, **_SHAPE})
    assert mc.architecture == family.architecture
    assert (mc.attention_bias, mc.qk_norm) == (family.attention_bias, family.qk_norm)
    model = _build(mc)
    assert type(model) is get_model_class(family.architecture)
    state = _unfused_state(model)
    model.load_weights(state.items())
    params = dict(model.named_parameters())
    for name, p in params.items():
        parts = name.split(".")
        packed = model.packed_modules_mapping.get(parts[-2])
        if packed:
            want = torch.cat([state["model." + ".".join(parts[:-2] + [q, parts[-1]])] for q in packed])
        else:
            want = state["model." + name]
        assert torch.equal(p.detach(), want), name
    # and each fused module's rows are exactly its parts'
    assert model.layers[0].self_attn.qkv_proj.weight.shape[0] == sum(
        model._fused_slices()[q][2] for q in model.packed_modules_mapping["qkv_proj"])


@pytest.mark.parametrize("family", model_families(), ids=lambda f: f.model_type)
def test_every_family_loads_a_tensor_parallel_shard(family):
    """Rank 1 of 2 gets its rows of each part (heads, KV heads, intermediate rows)."""
    mc = ModelConfig.from_hf_dict({"model_type": family.model_type, **_SHAPE})
    state = _unfused_state(_build(mc))
    model = _build(mc, TPGroup(rank=1, size=2))
    model.load_weights(state.items())
    d = mc.head_dim
    qkv = model.layers[1].self_attn.qkv_proj.weight.detach()
    q = state["model.layers.1.self_attn.q_proj.weight"][2 * d:4 * d]
    k = state["model.layers.1.self_attn.k_proj.weight"][d:2 * d]
    v = state["model.layers.1.self_attn.v_proj.weight"][d:2 * d]
    assert torch.equal(qkv, torch.cat([q, k, v]))
    gate_up = model.layers[0].mlp.gate_up_proj.weight.detach()
    gate = state["model.layers.0.mlp.gate_proj.weight"][24:]
    up = state["model.layers.0.mlp.up_proj.weight"][24:]
    assert torch.equal(gate_up, torch.cat([gate, up]))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_registered_class_loads_transformers_checkpoint(name, tiny_model):
    folder, hf = tiny_model(name)
    with open(os.path.join(folder, "config.json")) as f:
        mc = ModelConfig.from_hf_dict(json.load(f))
    model = _build(mc)
    model.load_weights(iter_safetensors(folder, progress=False))
    ref = hf.state_dict()
    attn = model.layers[1].self_attn
    want = torch.cat([ref[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight.detach(), want)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError) as ei:
        ModelConfig.from_hf_dict({"architectures": ["MistralForCausalLM"], **_SHAPE})
    msg = str(ei.value)
    assert "MistralForCausalLM" in msg and all(a in msg for a in supported_architectures())
    with pytest.raises(ValueError, match="'gpt2'.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", **_SHAPE})
    with pytest.raises(ValueError, match="'Foo'.*Qwen3ForCausalLM"):
        get_model_class("Foo")
    with pytest.raises(ValueError, match="x.gguf: GGUF architecture 'gpt2'.*llama, qwen2, qwen3"):
        gguf_family("gpt2", "x.gguf")


def test_architectures_take_precedence_over_model_type():
    arch, family = resolve_model_family({"architectures": ["Qwen2ForCausalLM"], "model_type": "llama"})
    assert arch == "Qwen2ForCausalLM" and family.model_type == "qwen2"


@pytest.fixture
def fresh_registry(monkeypatch):
    """Registry edits (``_MODELS``, fake modules) undone after the test."""
    registry._registered.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    registry._registered.cache_clear()


def _fake_family_module(fresh_registry, module: str, class_name: str, family: ModelFamily | None):
    mod = types.ModuleType(f"miniinfer.models.{module}")
    attrs = {} if family is None else {"family": family}
    setattr(mod, class_name, type(class_name, (DecoderForCausalLM,), attrs))
    fresh_registry.setitem(sys.modules, mod.__name__, mod)
    fresh_registry.setitem(registry._MODELS, module, class_name)
    return getattr(mod, class_name)


def test_a_new_family_is_one_module_and_one_line(fresh_registry):
    cls = _fake_family_module(fresh_registry, "toy", "ToyForCausalLM", ModelFamily(
        architectures=("ToyForCausalLM",), model_type="toy", attention_bias=True, gguf=GGUFSpec("toy")))
    assert supported_architectures()[-1] == "ToyForCausalLM"
    mc = ModelConfig.from_hf_dict({"model_type": "toy", **_SHAPE})
    assert mc.architecture == "ToyForCausalLM" and mc.attention_bias and not mc.qk_norm
    assert get_model_class("ToyForCausalLM") is cls and gguf_family("toy") is cls.family
    model = _build(mc)
    model.load_weights(_unfused_state(model).items())


def test_registry_rejects_clashing_or_undeclared_families(fresh_registry):
    _fake_family_module(fresh_registry, "llama_again", "LlamaAgain", ModelFamily(
        architectures=("LlamaAgain",), model_type="llama"))
    with pytest.raises(RuntimeError, match="model_type.*'llama'"):
        supported_architectures()
    registry._registered.cache_clear()
    fresh_registry.delitem(registry._MODELS, "llama_again")
    _fake_family_module(fresh_registry, "bare", "BareForCausalLM", None)
    with pytest.raises(TypeError, match="BareForCausalLM.*declares no ModelFamily"):
        supported_architectures()
