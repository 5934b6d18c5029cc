"""The training-time EAGLE head of ``benchmarks/train_eagle.py``, in plain torch: the same math and
parameter names (HF style) as the engine's :class:`~miniinfer.spec_decode.eagle_head.EagleHead`
before fusion, over padded batches with dense causal attention; its start from the target's
last decoder layer or from an earlier head file."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# --- the head, in plain torch (HF names, dense causal attention) --------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class _Attn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attn(cfg)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _MLP(cfg)


def _rope(x, cos, sin):
    """NeoX / HF ``rotate_half`` rotation of x [B, heads, L, D] by cos/sin [L, D/2] (fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def step_mask(length: int, step: int, device) -> torch.Tensor | None:
    """Keys visible to draft step ``step`` (1-based) at each query position, as a bool mask
    [L, step * L] over the keys of steps 1..step laid side by side (None: plain causal for
    step 1). The chain at query p started at anchor a = p - step + 1: it sees step 1's
    (teacher-forced) keys at positions <= a and step i's key at position a + i - 1 only."""
    if step == 1:
        return None
    p = torch.arange(length, device=device).unsqueeze(1)
    c = torch.arange(length, device=device).unsqueeze(0)
    blocks = [c <= p - step + 1] + [c == p - step + i for i in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


class TrainHead(nn.Module):
    """The training-time EAGLE head: same math and parameter names as the engine's
    :class:`~miniinfer.spec_decode.eagle_head.EagleHead` (before fusion), over padded batches.

    ``forward(embeds [B, L, H], feats [B, L, H], depth) -> [h_1, ..., h_depth]``, each
    ``[B, L, H]``: ``feats[:, p]`` is f_{p-1} (zeros at p = 0); ``h_1`` is the teacher-forced
    step; step j feeds ``h_{j-1}`` shifted by one position as the feature (the draft chain)
    with the attention of :func:`step_mask`. Right padding is harmless (causal).
    """

    def __init__(self, cfg, max_positions: int):
        super().__init__()
        from miniinfer.models.rotary import build_cos_sin_cache
        if cfg.qk_norm:
            raise ValueError("TrainHead: qk_norm targets (Qwen3) are not supported")
        self.cfg = cfg
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([_Layer(cfg)])
        self.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cache = build_cos_sin_cache(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin", cache, persistent=False)

    def _qkv(self, x, cos, sin):
        b, length, _ = x.shape
        a, d = self.layers[0].self_attn, self.cfg.head_dim
        q = a.q_proj(x).view(b, length, -1, d).transpose(1, 2)
        k = a.k_proj(x).view(b, length, -1, d).transpose(1, 2)
        v = a.v_proj(x).view(b, length, -1, d).transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def forward(self, embeds, feats, depth: int = 1):
        b, length, hidden = embeds.shape
        layer = self.layers[0]
        cos, sin = self.cos_sin[:length].chunk(2, dim=-1)
        keys, values, outs = [], [], []
        for step in range(1, depth + 1):
            x = self.fc(torch.cat([embeds, feats], dim=-1))
            q, k, v = self._qkv(layer.input_layernorm(x), cos, sin)
            keys.append(k)
            values.append(v)
            mask = step_mask(length, step, x.device)
            o = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=True)
            x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            h = self.norm(x)
            outs.append(h)
            feats = torch.cat([h.new_zeros(b, 1, hidden), h[:, :-1]], dim=1)
        return outs

    def hf_state_dict(self, dtype=torch.float16) -> dict[str, torch.Tensor]:
        """The head file's tensors (names of ``eagle_head.py``'s docstring), contiguous, on CPU."""
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}


def init_from_target(head: TrainHead, model) -> None:
    """Start the decoder layer from the target's last layer and ``norm`` from its final norm
    (un-fusing qkv_proj / gate_up_proj); ``fc`` stays random."""
    last, cfg = model.layers[-1], head.cfg
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    dst = head.layers[0]
    with torch.no_grad():
        qkv = last.self_attn.qkv_proj.weight.float()
        for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.split([q, kv, kv])):
            getattr(dst.self_attn, name).weight.copy_(part)
        dst.self_attn.o_proj.weight.copy_(last.self_attn.o_proj.weight.float())
        gate, up = last.mlp.gate_up_proj.weight.float().chunk(2)
        dst.mlp.gate_proj.weight.copy_(gate)
        dst.mlp.up_proj.weight.copy_(up)
        dst.mlp.down_proj.weight.copy_(last.mlp.down_proj.weight.float())
        dst.input_layernorm.weight.copy_(last.input_layernorm.weight.float())
        dst.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight.float())
        head.norm.weight.copy_(model.norm.weight.float())


def load_head(head: TrainHead, path: str) -> None:
    """Start from an earlier head file (``hf_state_dict``'s names and shapes); ValueError if it
    does not fit."""
    from safetensors.torch import load_file
    state = {k: v.float() for k, v in load_file(path).items()}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"--init {path}: not a head for this target ({e})") from None
