"""Qwen2 / Qwen2.5: :class:`DecoderForCausalLM` with a bias on q, k and v
(``attention_bias``, on unless ``config.json`` says otherwise)."""
from __future__ import annotations

from miniinfer.models.decoder import DecoderForCausalLM
from miniinfer.models.registry import GGUFSpec, ModelFamily


class Qwen2ForCausalLM(DecoderForCausalLM):
    family = ModelFamily(
        architectures=("Qwen2ForCausalLM",),
        model_type="qwen2",
        attention_bias=True,
        gguf=GGUFSpec("qwen2"),
    )
