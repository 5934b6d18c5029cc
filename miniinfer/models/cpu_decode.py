"""CPU steps in one C call: every decoder layer of a decode step (or of a small extend: a
short prompt, a speculative verify) run by ``decode_layers`` in ``kernels/cpu_kernels.c`` (the same kernels, in the same order, as the
per-module path, so the results are the same bits), instead of ~10 Python module calls and
~40 small torch ops per layer. Measured on the embedded SmolLM2 (2 cores): the Python between
the kernels was ~40 % of a batch-1 decode step.

Taken when the model is fp32 on the CPU without tensor parallelism, every projection is a
GGUF :class:`~miniinfer.models.packed_linear.QuantizedLinear` (Q4_1 / Q8_0), the Q4_1 ones
agree on int8 activations at the step's size (all of them or none: ``int8_min_rows``), the
attention backend is the C one, and every new token of the step is a row of the C attention
(``CPUDecodePlan.rows``). Otherwise the module path runs.
"""
from __future__ import annotations

import ctypes

import torch

from miniinfer.attention.cpu_backend import token_rows
from miniinfer.attention.metadata import AttentionMetadata
from miniinfer.kernels import cpu_kernels
from miniinfer.models.packed_linear import QuantizedLinear

PTRS_PER_LAYER = 15  # DECODE_PTRS in cpu_kernels.c
FORMATS = {"Q4_1": 0, "Q8_0": 1}


class CPUDecodePlan:
    """The layer table ``decode_layers`` walks (int64 pointers into the model's own tensors,
    which must stay where they are: build the plan after the KV cache is bound)."""

    def __init__(self, model, table: torch.Tensor, keep: list[torch.Tensor], q4_1: list[QuantizedLinear]):
        self.model = model
        self.table = table
        self._keep = keep  # the tensors whose pointers the table holds
        self._q4_1 = q4_1  # the Q4_1 projections: their int8_min_rows decide a step's activations
        cfg = model.config
        attn = model.layers[0].self_attn
        self.dims = (cfg.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                     model.layers[0].mlp.down_proj.in_features)
        self.eps = float(model.layers[0].input_layernorm.eps)
        self.scale = float(attn.scale)
        self.k_cache = attn.k_cache

    @classmethod
    def build(cls, model) -> "CPUDecodePlan | None":
        """None unless every layer fits (see the module docstring)."""
        lib = cpu_kernels._library()
        if lib is None or model.tp.enabled or model.layers[0].self_attn.backend.name != "cpu":
            return None
        rows, keep = [], []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            projs = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
            if not all(isinstance(p, QuantizedLinear) and p.fmt in FORMATS for p in projs):
                return None
            if any(p.bias is not None for p in projs[1:]):
                return None
            caches = (a.k_cache, a.v_cache)
            if not all(c.dtype == torch.float32 and c.is_contiguous() and c.numel() for c in caches):
                return None
            if a.head_dim % 16 or a.head_dim > 128:
                return None
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            qk = [a.q_norm.weight, a.k_norm.weight] if a.q_norm is not None else []
            tensors = [p.packed for p in projs] + ([projs[0].bias] if projs[0].bias is not None else []) + norms + qk
            tensors = [t.detach().contiguous() for t in tensors]
            if any(t.dtype not in (torch.float32, torch.uint8) for t in tensors):
                return None
            keep += tensors
            bias = projs[0].bias.detach().contiguous().data_ptr() if projs[0].bias is not None else 0
            rows.append([projs[0].packed.data_ptr(), projs[1].packed.data_ptr(), projs[2].packed.data_ptr(),
                         projs[3].packed.data_ptr()] + [FORMATS[p.fmt] for p in projs]
                        + [bias, norms[0].data_ptr(), norms[1].data_ptr(),
                           qk[0].data_ptr() if qk else 0, qk[1].data_ptr() if qk else 0,
                           caches[0].data_ptr(), caches[1].data_ptr()])
        q4_1 = [p for layer in model.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj) if p.fmt == "Q4_1"]
        return cls(model, torch.tensor(rows, dtype=torch.int64).contiguous(), keep, q4_1)

    def int8(self, t: int) -> bool | None:
        """Whether a step of ``t`` rows runs the Q4_1 GEMMs with int8 activations (as
        ``QuantizedLinear.forward`` would), None where the layers disagree (the module path runs)."""
        due = {p.int8_min_rows is not None and t >= p.int8_min_rows for p in self._q4_1}
        return None if len(due) > 1 else bool(due and due.pop())

    def rows(self, hidden: torch.Tensor, meta: AttentionMetadata):
        """The step as attention rows and its activations — (block table per token, keys each
        token sees, the most keys, tree bits per token or None: ``cpu_backend.token_rows``;
        then True where the Q4_1 GEMMs take int8 activations: :meth:`int8`) — if it can run
        here, else None: fp32, the Q4_1 layers agreeing on int8, and every new token a row of
        the C attention (decodes, and extends / prefill chunks small enough for the C path:
        ``attention/cpu_backend.py``; speculative verifies are such extends)."""
        t = hidden.shape[0]
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        if (t == 0 or qsl is None or lens is None or hidden.dtype != torch.float32
                or self.model.layers[0].self_attn.k_cache is not self.k_cache):
            return None
        int8 = self.int8(t)
        rows = None if int8 is None else token_rows(meta, qsl, lens)
        return (*rows, int8) if rows is not None and rows[0].shape[0] == t else None

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rows) -> torch.Tensor:
        """``hidden`` [T, H] (the embeddings, overwritten) -> the last layer's (output, residual);
        the caller applies the final norm. Raises ``ValueError`` for out-of-range inputs."""
        h, hq, hkv, d, inter = self.dims
        b = hidden.shape[0]
        lib = cpu_kernels._library()
        residual = torch.empty_like(hidden)
        scratch = torch.empty(lib.decode_scratch_floats(b, h, hq, hkv, d, inter), dtype=torch.float32)
        cos_sin = self.model.cos_sin_cache
        pos = positions.to(torch.int64).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables = rows[0].to(torch.int32).contiguous()
        lens = rows[1].to(torch.int32).contiguous()
        bits = None if rows[3] is None else rows[3].to(torch.int64).contiguous()
        kc = self.k_cache
        n_slots = kc.shape[0] * kc.shape[1]
        err = lib.decode_layers(
            self.table.data_ptr(), self.table.shape[0], hidden.data_ptr(), residual.data_ptr(), scratch.data_ptr(),
            b, h, hq, hkv, d, inter, ctypes.c_float(self.eps), pos.data_ptr(), cos_sin.data_ptr(),
            cos_sin.shape[-1], cos_sin.shape[0], slots.data_ptr(), n_slots, tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), kc.shape[1], rows[2], ctypes.c_float(self.scale), kc.shape[0],
            None if bits is None else bits.data_ptr(), int(rows[4]))
        if err:
            raise ValueError("decode step inputs out of range" if err < 3 else "out of memory")
        return hidden, residual
