"""Llama 2/3.x and SmolLM2: the plain :class:`DecoderForCausalLM` (no q/k/v bias, no q/k norm).

Their GGUF files (``general.architecture = "llama"``) have q/k rows permuted per head for
llama.cpp's interleaved RoPE, which the GGUF loader undoes.
"""
from __future__ import annotations

from miniinfer.models.decoder import DecoderForCausalLM
from miniinfer.models.registry import GGUFSpec, ModelFamily


class LlamaForCausalLM(DecoderForCausalLM):
    family = ModelFamily(
        architectures=("LlamaForCausalLM",),
        model_type="llama",
        gguf=GGUFSpec("llama", permuted_qk=True, head_dim_from_rope=True),
    )
