"""Qwen3 (dense): :class:`DecoderForCausalLM` with a per-head RMSNorm on q and k before RoPE
(``qk_norm``); ``head_dim`` may differ from ``hidden_size / num_heads``."""
from __future__ import annotations

from miniinfer.models.decoder import DecoderForCausalLM
from miniinfer.models.registry import GGUFSpec, ModelFamily


class Qwen3ForCausalLM(DecoderForCausalLM):
    family = ModelFamily(
        architectures=("Qwen3ForCausalLM",),
        model_type="qwen3",
        qk_norm=True,
        gguf=GGUFSpec("qwen3"),
    )
