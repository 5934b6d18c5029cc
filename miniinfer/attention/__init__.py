"""Attention backends behind a registry.

A backend stores the step's new K/V into the paged cache and computes attention for
the step's queries against everything cached for their sequences::

    backend.forward(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D],
                    k_cache [num_blocks, block_size, Hkv, D], v_cache (same),
                    meta: AttentionMetadata, scale: float) -> [T, H, D]

Register one with ``@register_backend("name")``; pick one with ``get_backend(name, device)``.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from miniinfer.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def get_backend(name: str, device: str) -> AttentionBackend:
    if name == "auto":
        if device.startswith("cuda"):
            name = "triton"
        else:
            from miniinfer.kernels import cpu_kernels
            name = "cpu" if cpu_kernels.available() else "torch"
    if name == "triton":
        from miniinfer.attention import triton_backend  # noqa: F401  (registers itself)
    elif name == "cpu":
        from miniinfer.attention import cpu_backend  # noqa: F401
    else:
        from miniinfer.attention import torch_backend  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"attention_backend must be one of {sorted(_REGISTRY) + ['auto']}, got {name!r}")
    return _REGISTRY[name]()
