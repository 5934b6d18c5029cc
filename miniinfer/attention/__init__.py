"""Attention backends.

A backend stores the step's new K/V into the paged cache and computes attention for
the step's queries against everything cached for their sequences::

    backend.forward(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D],
                    k_cache [num_blocks, block_size, Hkv, D], v_cache (same),
                    meta: AttentionMetadata, scale: float) -> [T, H, D]

and owns the static metadata buffers its CUDA graphs replay over
(``make_graph_buffers``, see ``attention/graph_buffers.py``): a backend with other
metadata brings its own buffers (the tree mask of a speculative verify is in the shared ones).

``get_backend(name, device)`` builds one; the table below is the whole registry (no
import side effects). ``auto`` picks ``triton`` on CUDA, and on CPU ``cpu`` where the C
kernels build, else ``torch``.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import torch

from miniinfer.attention.graph_buffers import GraphBuffers
from miniinfer.attention.metadata import AttentionMetadata

BACKENDS: dict[str, tuple[str, str]] = {  # name -> (module, class)
    "torch": ("miniinfer.attention.torch_backend", "TorchAttentionBackend"),
    "cpu": ("miniinfer.attention.cpu_backend", "CPUAttentionBackend"),
    "triton": ("miniinfer.attention.triton_backend", "TritonAttentionBackend"),
}


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor: ...

    def make_graph_buffers(self, max_seqs: int, max_tokens: int, max_blocks: int, max_seq_len: int,
                           device: torch.device) -> GraphBuffers: ...


def get_backend(name: str, device: str) -> AttentionBackend:
    """Raises ``ValueError`` for an unknown name."""
    if name == "auto":
        if device.startswith("cuda"):
            name = "triton"
        else:
            from miniinfer.kernels import cpu_kernels
            name = "cpu" if cpu_kernels.available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(BACKENDS) + ['auto']}, got {name!r}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()
