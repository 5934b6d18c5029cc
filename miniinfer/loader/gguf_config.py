"""An HF ``config.json``-style dict from a GGUF file's metadata.

The file's ``general.architecture`` picks the model family (``models/registry.py``); its
metadata keys (``<arch>.block_count``, ``<arch>.attention.head_count``, ...) give the
shape, and RoPE scaling comes from explicit ``rope.scaling.*`` keys or, for Llama 3.x, from
the precomputed ``rope_freqs.weight`` tensor.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

from miniinfer.loader.gguf_reader import GGUFFile
from miniinfer.models.registry import ModelFamily, gguf_family

logger = logging.getLogger(__name__)


def read_gguf_config(path: str) -> dict[str, Any]:
    """Return an HF ``config.json``-style dict describing the model in a GGUF file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not
    a valid GGUF, has an unsupported architecture (the message names the supported ones), or
    does not give the vocabulary size.
    """
    with GGUFFile(path) as g:
        return config_from_gguf(g)


def config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The HF config of an open GGUF file (see :func:`read_gguf_config`)."""
    family = gguf_family(g.fields.get("general.architecture"), g.path)
    arch = family.gguf.architecture
    get = _metadata_getter(g, arch)
    names = {t.name for t in g.tensors}
    cfg = {"architectures": [family.architecture], "model_type": family.model_type}
    cfg.update(_shape_config(g, family, get))
    cfg.update({
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": g.fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.fields.get("tokenizer.ggml.eos_token_id"),
    })
    if "tokenizer.ggml.padding_token_id" in g.fields:
        cfg["pad_token_id"] = g.fields["tokenizer.ggml.padding_token_id"]
    rope_scaling = _rope_scaling(g, get, cfg["head_dim"], cfg["rope_theta"])
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def gguf_head_counts(g: GGUFFile, family: ModelFamily) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)``; a per-layer KV list (all equal for our
    families) counts as its maximum."""
    get = _metadata_getter(g, family.gguf.architecture)
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    return heads, int(max(kv_heads) if isinstance(kv_heads, list) else kv_heads)


def _metadata_getter(g: GGUFFile, arch: str) -> Callable[..., Any]:
    """``get(key, default)`` for the architecture's keys: ``get("block_count")`` reads
    ``<arch>.block_count``."""
    return lambda key, default=None: g.fields.get(f"{arch}.{key}", default)


def _f32(x: Any) -> float:
    """GGUF stores float32; print it back as the short decimal it was written from (1e-05)."""
    return float(str(np.float32(x)))


def _shape_config(g: GGUFFile, family: ModelFamily, get: Callable[..., Any]) -> dict[str, Any]:
    """Vocabulary, widths, depth and head counts/size."""
    hidden = int(get("embedding_length"))
    heads, kv_heads = gguf_head_counts(g, family)
    ffn = get("feed_forward_length")
    if isinstance(ffn, list):
        ffn = max(ffn)
    head_dim = get("attention.key_length")
    if head_dim is None and family.gguf.head_dim_from_rope:
        head_dim = get("rope.dimension_count")
    return {
        "vocab_size": _vocab_size(g, get, family.gguf.architecture),
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(head_dim) if head_dim else hidden // heads,
    }


def _vocab_size(g: GGUFFile, get: Callable[..., Any], arch: str) -> int:
    """``<arch>.vocab_size``, else the length of the token list, else the embedding's rows."""
    vocab = get("vocab_size")
    if vocab is None:
        tokens = g.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        else:
            emb = g.tensor("token_embd.weight")
            vocab = emb.hf_shape[0] if emb is not None else None
    if vocab is None:
        raise ValueError(f"{g.path}: cannot determine vocab_size (no {arch}.vocab_size, "
                         "tokenizer.ggml.tokens or token_embd.weight)")
    return int(vocab)


def _rope_scaling(g: GGUFFile, get: Callable[..., Any], head_dim: int, rope_theta: float) -> dict | None:
    """HF ``rope_scaling`` from explicit metadata (linear / yarn / longrope ...) or from
    Llama-3.x's precomputed frequency factors; None for plain RoPE."""
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        rs: dict[str, Any] = {"rope_type": kind}
        if get("rope.scaling.factor") is not None:
            rs["factor"] = _f32(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length") is not None:
            rs["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        if get("rope.scaling.attn_factor") is not None:
            rs["attention_factor"] = _f32(get("rope.scaling.attn_factor"))
        for src, dst in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                         ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if get(src) is not None:
                rs[dst] = _f32(get(src))
        return rs
    freqs = g.tensor("rope_freqs.weight")
    if freqs is None:
        return None
    factors = g.dequantize(freqs).astype(np.float64).reshape(-1)
    rs = _llama3_rope_scaling(factors, head_dim, rope_theta)
    if rs is None:
        logger.warning("%s: rope_freqs.weight does not match Llama-3 rope scaling; ignoring it", g.path)
    return rs


def _llama3_rope_scaling(freq_factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Recognise llama.cpp's precomputed Llama-3.x ``rope_freqs`` as HF ``llama3`` scaling.

    The converter turns ``rope_scaling={"rope_type": "llama3", ...}`` into a per-frequency
    factor tensor and drops the parameters; we try the published Llama 3.1/3.2 settings
    and accept the first that reproduces the tensor exactly.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    factor = float(np.max(freq_factors))
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
        low_wl, high_wl = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        expect = np.where(wavelen < high_wl, 1.0,
                          np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == freq_factors.shape and np.allclose(expect, freq_factors, rtol=1e-4, atol=1e-5):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    return None
