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

CPU (fp32, kernels built): :meth:`EagleHead.load` re-quantizes the five projections (``fc``,
``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) to Q8_0 for the C GEMMs
(:class:`~miniinfer.models.packed_linear.QuantizedLinear`: 1.06 bytes a weight instead of 4;
a batch-1 head step is memory-bound), and the decoder layer of a decode-sized step runs in one
C call (``models/cpu_decode.py``, the target's path: same C attention over the head's cache).
Drafts only propose, the target verifies each, so the output stays exact. A/B switch: the
``cpu_q8`` attribute (before ``load``), default from ``MINIINFER_EAGLE_CPU_Q8`` (``0``: keep
the fp32 ``nn.Linear`` layers). CUDA is unchanged.
"""
from __future__ import annotations

import os
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

CPU_Q8_ENV = "MINIINFER_EAGLE_CPU_Q8"  # "0": the CPU head keeps fp32 linears (A/B)
QUANTIZED = ("fc", "layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj",
             "layers.0.mlp.down_proj")


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
        self.cpu_q8 = os.environ.get(CPU_Q8_ENV, "1").strip().lower() not in ("0", "false", "off", "no")
        self.cpu_decode = False  # models/cpu_decode.CPUDecodePlan: None (build on first use) once quantized

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
        if self.cpu_decode is not False and not hidden.is_cuda:  # the layer in one C call
            out = self._cpu_decode(hidden, positions)
            if out is not None:
                return self.norm(out[0], out[1])[0]
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
        if self.cpu_q8:
            self.quantize_for_cpu()

    def quantize_for_cpu(self) -> int:
        """CPU fp32 with the C kernels built: swap the projections (:data:`QUANTIZED`, fp32
        ``nn.Linear``) for Q8_0 :class:`QuantizedLinear` layers (``packed_linear.quantize_q8_0``;
        a shape the kernels don't take stays dense) and let decode-sized steps run the layer
        through ``CPUDecodePlan``. Returns how many layers were swapped (0 off the CPU)."""
        from miniinfer.models.packed_linear import QuantizedLinear, gguf_kernels_available, kernel_fits
        if not gguf_kernels_available(self.device, self.dtype, self.tp):
            return 0
        swapped = 0
        for name in QUANTIZED:
            parent_name, _, attr = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            dense = getattr(parent, attr)
            if isinstance(dense, nn.Linear) and kernel_fits(*dense.weight.shape):
                setattr(parent, attr, QuantizedLinear.from_dense(dense.weight, dense.bias))
                swapped += 1
        self.cpu_decode = None
        return swapped

    # The target's loader, unchanged: HF names -> slices of the fused parameters.
    _packed_part_rows = DecoderForCausalLM._packed_part_rows
    _fused_slices = DecoderForCausalLM._fused_slices
    _shard = DecoderForCausalLM._shard
    load_weights = DecoderForCausalLM.load_weights
    _expected_weights = DecoderForCausalLM._expected_weights
    _cpu_decode = DecoderForCausalLM._cpu_decode
