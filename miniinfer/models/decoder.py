"""One decoder-only transformer shared by the Llama (incl. SmolLM2), Qwen2/Qwen2.5 and Qwen3
families (``models/llama.py``, ``qwen2.py``, ``qwen3.py``; listed in ``models/registry.py``).

The families differ only in flags read from the config: Qwen2 adds a bias to q/k/v, Qwen3
adds a per-head RMSNorm on q and k. Q/K/V and gate/up are fused into one matmul each
(``packed_modules_mapping``); the weight loader writes each HF tensor into its slice of the
fused weight.

    hidden ─▶ [RMSNorm] ─▶ qkv_proj ─▶ (q/k norm) ─▶ RoPE ─▶ paged attention ─▶ o_proj ─┐
       ▲ residual add (fused with the next norm)                                         │
       └─────────────────────────────────────────────────────────────────────────────────┘
    then [RMSNorm] ─▶ gate_up_proj ─▶ SiLU(gate) * up ─▶ down_proj, same residual pattern.

Tensor parallelism: o_proj and down_proj return this rank's partial sum; the all-reduce is
done by the norm that follows, together with its residual add (``TPGroup.all_reduce_add_rms_norm``,
one kernel on CUDA when enabled): o_proj's by post_attention_layernorm, down_proj's by the next
layer's input_layernorm (or the final norm). Without TP that is the plain fused add + norm.
"""
from __future__ import annotations

from typing import ClassVar, Iterable, Mapping

import torch
from torch import nn

from miniinfer.attention import AttentionBackend
from miniinfer.config import ModelConfig
from miniinfer.attention.metadata import get_attention_metadata
from miniinfer.models import ops
from miniinfer.models.linear import Linear, linear, silu_mul_linear
from miniinfer.models.rotary import build_cos_sin_cache
from miniinfer.parallel import TPGroup


class RMSNorm(nn.Module):
    """``forward(x [..., size])`` -> normalized x; ``forward(x, residual)`` -> ``(norm(x + residual),
    x + residual)`` (the Triton and C kernels update ``residual`` in place). Same dtype as x.
    ``forward(x, residual, tp)``: ``x`` [T, size] is this rank's partial sum, all-reduced over
    ``tp`` before the add (fused with it where the communicator can; the plain form for one rank)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, tp: TPGroup | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        if tp is not None and tp.enabled:
            return tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """This rank's heads of the attention block (all of them without tensor parallelism):
    ``forward(positions [T] int64, x [T, hidden], rope) -> [T, hidden]`` (this rank's partial sum
    under TP: the next norm all-reduces it);
    stores the step's K/V in ``k_cache``/``v_cache`` through the attention backend."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, cos_sin_cache: torch.Tensor,
                 tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.num_heads = tp.split(cfg.num_heads, "num_attention_heads")
        self.num_kv_heads, _ = tp.kv_heads(cfg.num_kv_heads)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.backend = backend
        self.cos_sin_cache = cos_sin_cache  # shared by all layers, not a parameter
        self.k_cache = self.v_cache = torch.empty(0)  # set by the model runner

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rope: ops.RopeTables | None) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        meta = get_attention_metadata()
        if rope is None and self.q_norm is None and hasattr(self.backend, "forward_with_rope"):
            # Triton path (rope tables None): RoPE fused with the backend's KV-cache store
            o = self.backend.forward_with_rope(
                positions, self.cos_sin_cache, self.head_dim, q.view(t, self.num_heads, self.head_dim),
                k.view(t, self.num_kv_heads, self.head_dim), v, self.k_cache, self.v_cache, meta, self.scale)
            return self.o_proj(o.reshape(t, self.q_size))
        if rope is not None and self.q_norm is None:
            # torch path: q and k sit side by side in qkv; rotate them as one [T, H + Hkv, D]
            qk = ops.rotate_leading_heads(qkv, self.num_heads + self.num_kv_heads, self.head_dim, positions,
                                          self.cos_sin_cache, rope)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = q.view(t, self.num_heads, self.head_dim)
            k = k.view(t, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q = self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
                k = self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
            q, k = ops.apply_rope(positions, q, k, self.cos_sin_cache, self.head_dim, rope)
        o = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    """SwiGLU: ``down_proj(SiLU(gate) * up)``, ``[T, hidden] -> [T, hidden]`` (a partial sum under TP)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        inter = tp.split(cfg.intermediate_size, "intermediate_size")
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_mul_linear(self.gate_up_proj(x), self.down_proj)  # (fused GEMV prologue: opt-in)


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP: ``forward(positions, hidden, residual, rope) -> (hidden,
    residual)``, both ``[T, hidden]``; ``residual`` is None on the first layer. Under TP the
    ``hidden`` passed in and returned is a partial sum (the MLP's), reduced by the next norm."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, cos_sin_cache: torch.Tensor,
                 tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend, cos_sin_cache, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, positions, hidden, residual, rope: ops.RopeTables | None = None):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, self.tp)
        hidden = self.self_attn(positions, hidden, rope)
        hidden, residual = self.post_attention_layernorm(hidden, residual, self.tp)
        return self.mlp(hidden), residual


class DecoderForCausalLM(nn.Module):
    """The decoder-only LM behind ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``
    (the family classes only add their :class:`~miniinfer.models.registry.ModelFamily`; this
    class alone also runs all three, the flags come from ``cfg``).

    ``forward(input_ids [T] int64, positions [T] int64) -> hidden [T, hidden_size]`` in the
    weights' dtype, over the flattened tokens of a step (attention metadata from the forward
    context); ``compute_logits(hidden [N, hidden_size]) -> [N, vocab_size]`` float32.
    """

    # fused parameter -> the HF projections stacked in it, in row order. A family whose
    # modules differ overrides it (and ``_packed_part_rows``).
    packed_modules_mapping: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int,
                 device: torch.device | str = "cpu", tp: TPGroup = TPGroup()):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.vocab_local = tp.split(cfg.vocab_size, "vocab_size")
        self.vocab_start = tp.rank * self.vocab_local
        # float32 whatever the weights' dtype; shared by every layer; not a parameter.
        cos_sin = build_cos_sin_cache(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.cos_sin_cache = cos_sin
        # Replicated on every rank (the lookup reads only its rows; a vocab-parallel table
        # would cost an all-reduce per forward and break comm.py's even all-reduce count).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, cos_sin, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, self.vocab_local, bias=False)
        self.packed_lm_head: nn.Module | None = None  # a tied head's CPU copy (pack_for_cpu)
        # models/cpu_decode.CPUDecodePlan once built, False when the model can't use it
        self.cpu_decode = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if not hidden.is_cuda and self.cpu_decode is not False:  # CPU steps of small chunks: one C call
            out = self._cpu_decode(hidden, positions)
            if out is not None:
                hidden, residual = out
                return self.norm(hidden, residual)[0]
        residual = None
        rope = ops.rope_tables(positions, self.cos_sin_cache)  # None on the Triton path
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, rope)
        hidden, _ = self.norm(hidden, residual, self.tp)
        return hidden

    def _cpu_decode(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(last layer's output, residual) from ``models/cpu_decode.py`` when the step fits, else None."""
        cache = self.layers[0].self_attn.k_cache
        if cache.numel() == 0:  # no KV cache bound (yet)
            return None
        plan = self.cpu_decode
        if plan is None or plan.k_cache is not cache:  # first step, or a new cache: pointers change
            from miniinfer.models.cpu_decode import CPUDecodePlan
            plan = self.cpu_decode = CPUDecodePlan.build(self) or False  # False: never fits, stop asking
            if not plan:
                return None
        meta = get_attention_metadata()
        rows = plan.rows(hidden, meta)
        return plan.run(hidden, positions, meta, rows) if rows is not None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif self.packed_lm_head is not None:
            logits = self.packed_lm_head(hidden)
        else:  # tied: this rank's vocabulary rows of the (replicated) embedding
            weight = self.embed_tokens.weight
            if self.tp.enabled:
                weight = weight[self.vocab_start:self.vocab_start + self.vocab_local]
            logits = linear(hidden, weight)
        return self.tp.all_gather_last_dim(logits).float()

    def use_quantized_weights(self, rows: dict[str, tuple[str, torch.Tensor]]) -> int:
        """CPU: swap every projection whose HF parts all came in one GGUF format the kernels
        take for a :class:`QuantizedLinear`; a tied LM head over a quantized embedding gets one
        too. The rest stay dense; with tensor parallelism nothing is swapped.

        ``rows``: HF name -> (format, raw blocks uint8 ``[out, bytes per row]``); the parts of
        a fused projection are concatenated by rows in ``packed_modules_mapping`` order.
        Returns how many projections were swapped.
        """
        if self.tp.enabled:
            return 0
        rows = {k.removeprefix("model."): v for k, v in rows.items()}
        swapped = 0
        for prefix, parent in list(self.layers.named_modules(prefix="layers")):
            for name, dense in list(parent.named_children()):
                if not isinstance(dense, nn.Linear):
                    continue
                parts = self.packed_modules_mapping.get(name, (name,))
                q = _quantized_linear(rows, [f"{prefix}.{p}.weight" for p in parts], dense.weight, dense.bias)
                if q is not None:
                    setattr(parent, name, q)
                    swapped += 1
        head_name = "embed_tokens.weight" if self.lm_head is None else "lm_head.weight"
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        q = _quantized_linear(rows, [head_name], weight)
        if q is not None:
            if self.lm_head is None:
                self.packed_lm_head = q
            else:
                self.lm_head = q
            swapped += 1
        return swapped

    def pack_for_cpu(self) -> None:
        """CPU fp32: lay every projection still dense (and the LM head; a tied one gets its own
        packed copy, the embedding lookup keeps the plain table) out for oneDNN."""
        from miniinfer.models.packed_linear import PackedLinear, pack_linears
        pack_linears(self)
        if self.lm_head is None and self.packed_lm_head is None:
            self.packed_lm_head = PackedLinear(self.embed_tokens.weight, None)

    # --- weights -------------------------------------------------------------------
    def _packed_part_rows(self) -> dict[str, tuple[int, int]]:
        """HF projection stacked in a fused parameter -> (its rows on this rank, first row of
        this rank's slice of the HF tensor)."""
        cfg, tp = self.config, self.tp
        d = cfg.head_dim
        heads = tp.split(cfg.num_heads, "num_attention_heads")
        kv, kv_start = tp.kv_heads(cfg.num_kv_heads)
        inter = tp.split(cfg.intermediate_size, "intermediate_size")
        return {"q_proj": (heads * d, tp.rank * heads * d), "k_proj": (kv * d, kv_start * d),
                "v_proj": (kv * d, kv_start * d), "gate_proj": (inter, tp.rank * inter),
                "up_proj": (inter, tp.rank * inter)}

    def _fused_slices(self) -> dict[str, tuple[str, int, int, int]]:
        """HF name -> (fused parameter, offset in it, rows, first row of this rank's source
        slice), laid out in ``packed_modules_mapping`` order."""
        part_rows = self._packed_part_rows()
        slices = {}
        for fused, parts in self.packed_modules_mapping.items():
            offset = 0
            for part in parts:
                rows, src = part_rows[part]
                slices[part] = (fused, offset, rows, src)
                offset += rows
        return slices

    def _shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a non-fused HF tensor."""
        if not self.tp.enabled:
            return tensor
        if name == "lm_head.weight":
            return tensor[self.vocab_start:self.vocab_start + self.vocab_local]
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            cols = tensor.shape[1] // self.tp.size
            return tensor[:, self.tp.rank * cols:(self.tp.rank + 1) * cols]
        return tensor  # norms: replicated

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors (``model.`` prefix optional, any dtype) into the fused,
        sharded parameters.

        Raises ``ValueError`` for an unexpected name, a shape mismatch, or missing weights.
        """
        params = dict(self.named_parameters())
        slices = self._fused_slices()
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            parts = name.split(".")
            fused = slices.get(parts[-2]) if len(parts) >= 2 else None
            if fused is not None:
                target = ".".join(parts[:-2] + [fused[0], parts[-1]])
                _, offset, rows, src = fused
                with torch.no_grad():
                    params[target].data[offset:offset + rows].copy_(tensor[src:src + rows])
                loaded.add(f"{target}[{parts[-2]}]")
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            tensor = self._shard(name, tensor)
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].data.copy_(tensor)
            loaded.add(name)
        missing = self._expected_weights(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")

    def _expected_weights(self, params: dict[str, nn.Parameter]) -> set[str]:
        """What a complete checkpoint fills: every parameter, a fused one once per part
        (``"layers.0.self_attn.qkv_proj.weight[q_proj]"``)."""
        expected = set()
        for pname in params:
            parts = pname.split(".")
            packed = self.packed_modules_mapping.get(parts[-2]) if len(parts) >= 2 else None
            if packed:
                expected.update(f"{pname}[{p}]" for p in packed)
            else:
                expected.add(pname)
        return expected


def _quantized_linear(rows: dict[str, tuple[str, torch.Tensor]], names: list[str], weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> nn.Module | None:
    """The raw blocks of ``names`` (one GGUF format, stacked by rows) as one
    :class:`QuantizedLinear` standing for ``weight`` [out, in]; None if a part is missing,
    the formats differ, or the kernels do not take the shape. Parts mixing Q4_1 and Q8_0 are
    all made Q8_0 (``gguf_requant.q4_1_to_q8_0``, error ~1/254 of a block's max)."""
    from miniinfer.models.packed_linear import QuantizedLinear, kernel_fits
    got = [rows.get(n) for n in names]
    if any(g is None for g in got):
        return None
    if {fmt for fmt, _ in got} == {"Q4_1", "Q8_0"}:  # e.g. Q4_K q/k next to a Q6_K v: all Q8_0
        from miniinfer.loader.gguf_requant import q4_1_to_q8_0
        conv = [b if f == "Q8_0" else q4_1_to_q8_0(b.numpy()) for f, b in got]
        if any(b is None for b in conv):
            return None
        got = [("Q8_0", b if isinstance(b, torch.Tensor) else torch.from_numpy(b)) for b in conv]
    if len({fmt for fmt, _ in got}) != 1:
        return None
    blocks = torch.cat([b for _, b in got]) if len(got) > 1 else got[0][1]
    out_features, in_features = weight.shape
    if blocks.shape[0] != out_features or not kernel_fits(out_features, in_features):
        return None
    return QuantizedLinear(blocks, in_features, bias, got[0][0])
