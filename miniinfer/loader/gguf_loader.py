"""Read llama.cpp GGUF files: an HF-style config dict and HF-named, dequantized weights.

The file is parsed by our own reader (``loader/gguf_reader.py``), the config built by
``loader/gguf_config.py``; this module maps the tensors to HF names and layout. Two
llama.cpp conventions are undone here:

* GGUF lists a tensor's dims innermost first (``ne[0]`` = input features), so a
  ``[in, out]`` GGUF shape is an HF ``[out, in]`` weight.
* ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj``/``k_proj`` of *llama*-arch
  models so that llama.cpp's interleaved ("GPT-J" style) rotary matches HF's half-split
  ("NeoX" style) one.  Per head, HF row ``(half, j)`` went to row ``(j, half)``; we
  swap back.  Which families were permuted is ``GGUFSpec.permuted_qk`` in the model
  registry (Qwen2/Qwen3 GGUFs use NeoX rotary in llama.cpp and are not permuted).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterator

import numpy as np
import torch

from miniinfer.loader.gguf_config import gguf_head_counts, read_gguf_config
from miniinfer.loader.gguf_reader import SUPPORTED_GGML_TYPES, GGUFFile, GGUFTensorInfo, check_ggml_type
from miniinfer.loader.gguf_requant import to_kernel_rows
from miniinfer.models.registry import gguf_family

__all__ = ["SUPPORTED_GGML_TYPES", "gguf_to_hf_name", "iter_gguf_weights", "read_gguf_config"]

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp stores that have no HF counterpart (consumed by read_gguf_config).
_SKIP = {"rope_freqs.weight"}
# formats the CPU kernels multiply without dequantizing (models/packed_linear.py): Q4_1 / Q8_0
# as stored, Q4_0 / Q4_K converted to Q4_1 and Q6_K to Q8_0 at load (loader/gguf_requant.py)
_KERNEL_FORMATS = ("Q4_1", "Q8_0", "Q4_0", "Q4_K", "Q6_K")


def gguf_to_hf_name(name: str) -> str | None:
    """Map a llama.cpp tensor name to its HF name (None if it has no HF counterpart)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def iter_gguf_weights(path: str, dtype: torch.dtype = torch.float32, progress: bool = True,
                      quantized_rows: dict[str, tuple[str, torch.Tensor]] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight of a GGUF model, dequantized to ``dtype``.

    Tensors come out contiguous in HF's ``[out, in]`` layout; llama-arch q/k projections are
    un-permuted back to HF's rotary convention.  Every tensor's type is checked before
    any is dequantized, so an unsupported quantization fails fast (``ValueError`` naming the
    tensor, its type and the supported ones; likewise for an unsupported architecture or a
    truncated file).  With ``quantized_rows``, every Q4_1 / Q8_0 matrix is also stored there
    as ``(type, raw blocks uint8 [out, bytes per row])`` (rows un-permuted the same way) for
    the CPU kernels that multiply them directly; Q4_0 / Q4_K matrices go there converted to
    Q4_1 and Q6_K ones to Q8_0 (``loader/gguf_requant.py``: Q4_0 exactly, the K-quants to
    within ~1e-3 / ~5e-3 relative).
    """
    from tqdm.auto import tqdm

    g = GGUFFile(path)
    try:
        family = gguf_family(g.fields.get("general.architecture"), path)
        for t in g.tensors:
            if t.name not in _SKIP and gguf_to_hf_name(t.name) is not None:
                check_ggml_type(t)
        heads, kv_heads = gguf_head_counts(g, family)
        permuted = {".attn_q.": heads, ".attn_k.": kv_heads} if family.gguf.permuted_qk else {}

        bar = tqdm(g.tensors, desc=f"Loading {os.path.basename(path)}", unit="tensor",
                   disable=not progress, leave=False)
        for t in bar:
            hf_name = gguf_to_hf_name(t.name)
            if hf_name is None:
                if t.name not in _SKIP:
                    logger.warning("%s: ignoring GGUF tensor %r (no HF counterpart)", path, t.name)
                continue
            w = _to_torch(g, t, dtype)
            raw = fmt = None
            if quantized_rows is not None and t.type_name in _KERNEL_FORMATS and len(t.hf_shape) == 2:
                kept = to_kernel_rows(t.type_name, g.raw(t))
                if kept is None:
                    logger.info("%s: %s tensor %r kept dequantized (a scale overflows fp16 when "
                                "converted)", path, t.type_name, t.name)
                else:
                    fmt, raw = kept[0], torch.from_numpy(kept[1])
            n_head = next((n for key, n in permuted.items() if key in t.name), None)
            if n_head is not None:
                w = _unpermute_rotary(w, n_head)
                raw = None if raw is None else _unpermute_rotary(raw, n_head)
            if raw is not None:
                quantized_rows[hf_name] = (fmt, raw)
            yield hf_name, w
        bar.close()
    finally:
        g.close()


def _to_torch(g: GGUFFile, t: GGUFTensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in ``dtype``, HF shape; plain float tensors are viewed straight from the
    mapping and copied once."""
    check_ggml_type(t)
    kind = t.type_name
    if kind in ("F32", "F16", "BF16"):
        raw = g.raw(t)
        if kind == "F32":
            src = torch.from_numpy(raw.view(np.float32))
        elif kind == "F16":
            src = torch.from_numpy(raw.view(np.float16))
        else:
            src = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return src.reshape(t.hf_shape).to(dtype, copy=True)
    return torch.from_numpy(g.dequantize(t)).to(dtype)


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute()`` of q/k rows (works for weights and biases)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute a q/k tensor of {rows} rows for {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
