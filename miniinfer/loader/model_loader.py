"""Find a model (HF folder, GGUF file, preset or the embedded default) and build it."""
from __future__ import annotations

import glob
import json
import os
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

import torch
from tqdm.auto import tqdm

from miniinfer.attention import AttentionBackend
from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.models.decoder import DecoderForCausalLM
from miniinfer.models.packed_linear import packing_available, gguf_kernels_available
from miniinfer.models.registry import get_model_class
from miniinfer.parallel import TPGroup

PRESETS = ("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen3-0.6b", "qwen3-8b", "llama-3-8b")


@dataclass
class ModelSource:
    load_format: str  # safetensors | gguf | dummy
    name: str  # what the server calls the model
    hf_config: dict
    weights_path: str | None  # folder (safetensors) or file (gguf); None for presets
    tokenizer_path: str | None  # folder or .gguf file; None when there is none


def preset_config(name: str) -> dict:
    text = resources.files("miniinfer.loader").joinpath("presets", f"{name}.json").read_text()
    return json.loads(text)


def resolve_model(cfg: EngineConfig) -> ModelSource:
    from miniinfer.loader.embedded import embedded_model_path
    model = cfg.model if cfg.model is not None else embedded_model_path()
    fmt = cfg.load_format
    if model in PRESETS:
        if fmt not in ("auto", "dummy"):
            raise ValueError(f"model {model!r} is a preset: it only has random weights (load_format='dummy')")
        return ModelSource("dummy", model, preset_config(model), None, cfg.tokenizer)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"model path {model!r} does not exist")
        from miniinfer.loader.gguf_loader import read_gguf_config
        name = os.path.basename(model).removesuffix(".gguf")
        return ModelSource("dummy" if fmt == "dummy" else "gguf", name, read_gguf_config(model), model,
                           cfg.tokenizer or model)
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        with open(os.path.join(model, "config.json")) as f:
            hf_config = json.load(f)
        has_tok = any(os.path.exists(os.path.join(model, n))
                      for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tok = cfg.tokenizer or (model if has_tok else None)
        name = os.path.basename(os.path.normpath(model))
        if fmt == "dummy":
            return ModelSource("dummy", name, hf_config, None, tok)
        if not glob.glob(os.path.join(model, "*.safetensors")):
            raise ValueError(f"model folder {model!r} has no *.safetensors files "
                             "(use load_format='dummy' for random weights)")
        return ModelSource("safetensors", name, hf_config, model, tok)
    raise ValueError(f"model {model!r} is not a .gguf file, a folder with config.json, or a preset "
                     f"({', '.join(PRESETS)})")


def iter_safetensors(folder: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for path in tqdm(files, desc="Loading safetensors", disable=not progress or len(files) < 2):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def dummy_weights(cfg: ModelConfig, seed: int, device: torch.device,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Random HF-named weights of a sensible scale (std 0.02; norms at 1), each **full** tensor
    drawn from its own generator seeded by (seed, name), so every tensor-parallel rank slices
    the same model out of it: TP=1 and TP=N hold identical weights and greedy outputs compare.
    Yields one tensor at a time (peak memory: the largest one, the embedding)."""
    h, d, inter, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (v, h))]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
        if cfg.attention_bias:
            shapes += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]
        if cfg.qk_norm:
            shapes += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
    shapes.append(("norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head.weight", (v, h)))
    for name, shape in shapes:
        if "norm" in name:
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)
        yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)


def build_model(source: ModelSource, model_config: ModelConfig, backend: AttentionBackend,
                cfg: EngineConfig, max_positions: int, progress: bool = True,
                tp: TPGroup = TPGroup()) -> DecoderForCausalLM:
    """The registered model class for ``model_config.architecture``, built on the meta device,
    materialized on ``cfg.device`` in ``cfg.torch_dtype`` with this rank's shard of the
    weights (random for ``dummy``), in eval mode; on CPU in fp32, projections swapped for the
    quantized / packed linears."""
    model_cls = get_model_class(model_config.architecture)
    device, dtype = torch.device(cfg.device), cfg.torch_dtype
    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(model_config, backend, max_positions, device, tp)
    finally:
        torch.set_default_dtype(prev_dtype)
    model.to_empty(device=device)
    if source.load_format == "dummy":
        model.load_weights(dummy_weights(model_config, cfg.seed, device, dtype))
    elif source.load_format == "gguf":
        from miniinfer.loader.gguf_loader import iter_gguf_weights
        quantized = {} if cfg.cpu_gguf_kernels and gguf_kernels_available(device, dtype, tp) else None
        model.load_weights(iter_gguf_weights(source.weights_path, dtype=dtype, progress=progress,
                                             quantized_rows=quantized))
        if quantized:
            model.use_quantized_weights(quantized)
            if cfg.cpu_int8_activations:
                from miniinfer.models.packed_linear import use_int8_activations
                use_int8_activations(model)
    else:
        model.load_weights(iter_safetensors(source.weights_path, progress))
    if cfg.cpu_packed_weights and packing_available(device, dtype):
        model.pack_for_cpu()  # whatever is still a plain nn.Linear, and a tied LM head
    return model.eval()
