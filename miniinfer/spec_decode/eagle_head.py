"""The EAGLE draft head: one decoder layer that predicts the target's next feature.

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (2024), and
EAGLE-2 (2024, dynamic draft trees over the same head). The head works at the *feature*
level: the target's feature ``f_p`` is its final hidden state at position p after the final
RMSNorm (what :meth:`DecoderForCausalLM.forward` returns, the LM head's input).

One head step at position p::

    concat([embed(x_p), f_{p-1}], -1)  [T, 2H]   (embedding FIRST, then the feature)
      ─▶ fc (Linear 2H -> H, no bias)
      ─▶ DecoderLayer (pre-norm attention with RoPE at position p, causal over the head's own
         earlier positions in its paged KV cache, + SwiGLU MLP; the target's shapes)
      ─▶ norm (RMSNorm) ─▶ h_p ≈ f_p            [T, H]

Draft logits are the target's LM head applied to ``h_p`` (they predict x_{p+1}); deeper drafts
feed ``h_p`` back as the next step's feature. The embedding and the LM head are the target's
(frozen) and are not part of the head's weights file.

Weights file (safetensors, any float dtype, HF-style names, written by
``benchmarks/train_eagle.py``)::

    fc.weight                                   [H, 2H]
    layers.0.input_layernorm.weight             [H]
    layers.0.self_attn.{q,k,v}_proj.weight      [heads*D | kv_heads*D, H]   (fused into qkv_proj)
    layers.0.self_attn.o_proj.weight            [H, heads*D]
    layers.0.post_attention_layernorm.weight    [H]
    layers.0.mlp.{gate,up}_proj.weight          [I, H]                      (fused into gate_up_proj)
    layers.0.mlp.down_proj.weight               [H, I]
    norm.weight                                 [H]

(plus ``q_proj/k_proj/v_proj`` biases for a target with ``attention_bias``, and
``self_attn.{q,k}_norm.weight [D]`` for one with ``qk_norm``).
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import nn

from miniinfer.attention import AttentionBackend
from miniinfer.config import ModelConfig
from miniinfer.models import ops
from miniinfer.models.decoder import DecoderForCausalLM, DecoderLayer, RMSNorm
from miniinfer.models.rotary import build_cos_sin_cache
from miniinfer.parallel import TPGroup
from miniinfer.worker import kv_cache


class EagleHead(nn.Module):
    """The draft head (one layer), in the engine's fused layout.

    ``EagleHead(model_config, backend, max_positions, device, dtype)``: ``model_config`` is
    the *target's* :class:`ModelConfig` (the head copies its hidden size, heads, kv heads,
    head_dim, intermediate size, RoPE and RMSNorm eps); ``max_positions`` sizes the RoPE
    table (the target's ``max_model_len`` or more); parameters live on ``device`` in
    ``dtype``. Call :meth:`load` for real weights and :meth:`allocate_kv_cache` before the
    first forward.
    """

    # same fused layout as the target (reused by the inherited weight-loading helpers)
    packed_modules_mapping: ClassVar[Mapping[str, tuple[str, ...]]] = DecoderForCausalLM.packed_modules_mapping

    def __init__(self, model_config: ModelConfig, backend: AttentionBackend, max_positions: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = model_config
        self.config = cfg
        self.tp = TPGroup()  # the head runs unsharded
        self.lm_head = None  # an ``lm_head.weight`` in a file is skipped, as for a tied target
        self.backend = backend
        self.device = torch.device(device)
        self.dtype = dtype
        self.cos_sin_cache = build_cos_sin_cache(cfg.head_dim, max_positions, cfg.rope_theta,
                                                 cfg.rope_scaling, self.device)
        hidden = cfg.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(cfg, backend, self.cos_sin_cache, self.tp)])
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.to(device=self.device, dtype=dtype)
        self.kv_caches: torch.Tensor | None = None

    # --- the forward -----------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One head step over the flattened tokens of a batch (layout of the attention
        metadata in the forward context, decodes first, as for the target).

        ``embeds [T, H]``: the target's embeddings of the tokens x_p; ``features [T, H]``:
        f_{p-1} (the target's post-norm hidden state of the previous position, or the head's
        own output for a deeper draft); ``positions [T]`` int64: p. Inputs are cast to the
        head's dtype. Returns ``h [T, H]`` (post-norm, the head's dtype), which approximates
        f_p; the target's LM head turns it into draft logits. Stores the step's K/V in the
        head's cache at the metadata's ``slot_mapping``. Run inside ``forward_context(meta)``.
        """
        x = torch.cat([embeds.to(self.dtype), features.to(self.dtype)], dim=-1)
        hidden = self.fc(x)
        rope = ops.rope_tables(positions, self.cos_sin_cache)  # None on the Triton path
        hidden, residual = self.layers[0](positions, hidden, None, rope)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    # --- KV cache --------------------------------------------------------------------
    def kv_cache_dtype(self) -> torch.dtype:
        """The cache dtype: the head's on CUDA, float32 on CPU (as the target runner does)."""
        return self.dtype if self.device.type == "cuda" else torch.float32

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        """Allocate and bind the head's one-layer paged cache.

        Returns the zeroed tensor ``[2 (K/V), 1 (layers), num_blocks, block_size, kv_heads,
        head_dim]`` (the target's layout, ``worker/kv_cache.py``), dtype
        :meth:`kv_cache_dtype`. A drafter typically passes the target's ``num_blocks`` and
        ``block_size`` so that a sequence's target block table addresses the head's cache too.
        """
        attn = self.layers[0].self_attn
        layout = kv_cache.KVCacheLayout(num_blocks, block_size, 1, attn.num_kv_heads, attn.head_dim,
                                        self.kv_cache_dtype(), num_blocks * block_size)
        self.kv_caches = kv_cache.allocate_kv_cache(self, layout, self.device)
        return self.kv_caches

    # --- weights ---------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF-style name -> shape of every tensor a complete head file holds."""
        slices = self._fused_slices()
        shapes: dict[str, tuple[int, ...]] = {}
        for pname, param in self.named_parameters():
            parts = pname.split(".")
            packed = self.packed_modules_mapping.get(parts[-2]) if len(parts) >= 2 else None
            if not packed:
                shapes[pname] = tuple(param.shape)
                continue
            for part in packed:
                rows = slices[part][2]
                shapes[".".join(parts[:-2] + [part, parts[-1]])] = (rows,) + tuple(param.shape[1:])
        return shapes

    def load(self, path: str) -> None:
        """Load a head file (safetensors, HF-style names, see the module docstring).

        Raises ``ValueError`` naming the tensors that are missing, unexpected or mis-shaped
        (``FileNotFoundError`` if there is no file).
        """
        from safetensors.torch import load_file
        tensors = load_file(path)
        tensors = {k.removeprefix("model."): v for k, v in tensors.items() if k != "lm_head.weight"}
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        misshaped = [f"{n} {tuple(t.shape)} (expected {expected[n]})" for n, t in sorted(tensors.items())
                     if n in expected and tuple(t.shape) != expected[n]]
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        if misshaped:
            problems.append(f"mis-shaped {misshaped}")
        if problems:
            raise ValueError(f"EAGLE head file {path!r} does not fit the target "
                             f"(hidden {self.config.hidden_size}): " + "; ".join(problems))
        self.load_weights(tensors.items())

    # The target's loader, unchanged: HF names -> slices of the fused parameters.
    _packed_part_rows = DecoderForCausalLM._packed_part_rows
    _fused_slices = DecoderForCausalLM._fused_slices
    _shard = DecoderForCausalLM._shard
    load_weights = DecoderForCausalLM.load_weights
    _expected_weights = DecoderForCausalLM._expected_weights
