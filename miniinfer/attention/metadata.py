"""The one piece of per-step global state: the batch's attention metadata.

The model runner sets it around each forward (``with forward_context(meta):``) so that
attention layers deep in the model can read the block tables without threading them
through every call. It is the engine's one piece of per-step global state (the others are
listed in docs/ARCHITECTURE.md, "Global state").

Token layout of a step (decodes first, then prefill / extend chunks)::

    flat tokens:  [d0][d1][d2][ p0 p0 p0 p0 ][ p1 p1 ]
    query_start:   0   1   2   3             7        9
    seq_lens:      ctx+1 ...   (tokens in the KV cache after this step, per sequence)

A sequence's new tokens sit at positions ``seq_len - q_len ... seq_len - 1``; they attend
to every cached token before them and causally to each other.

Tree mask (speculative verify of a draft tree), optional: ``tree_mask`` [T] int64, one value
per new token in the row order above. For token t of a sequence with KV length
``L = seq_lens[b]`` after the step::

    tree_mask[t] == -1   causal, as above
    otherwise            key j (0 <= j < L) is seen iff j < L - 64
                         or bit (j - (L - 64)) of tree_mask[t] is set

i.e. the window is always the sequence's last 64 keys (bit 0 = key L - 64, bit 63 = key
L - 1, the sign bit); bits of a window starting below key 0 are ignored. The rule is on KV
indices, so a window may hold tree keys written by earlier steps. The builder makes every
token see at least itself. Decode rows (q_len 1) may ignore it; ``None``: all causal.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class AttentionMetadata:
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    num_decode_tokens: int  # == num_decodes; a backend routes every row through its extend path otherwise
    query_start_loc: torch.Tensor  # [B+1] int32, on device
    seq_lens: torch.Tensor  # [B] int32, on device: KV length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, on device (unused entries: 0)
    slot_mapping: torch.Tensor  # [T] int64, on device: cache slot of each new token (-1: skip)
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop per sequence (the torch path on CPU).
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Tree mask (see the module docstring): [T] int64 on device, -1 = causal row; host copy.
    tree_mask: torch.Tensor | None = None
    tree_mask_cpu: list[int] | None = None
    # What a backend derives from the above once per step and reuses in every layer
    # (e.g. the torch path's gather indices and mask). Dies with the step.
    per_step: dict = field(default_factory=dict)

    def step_cached(self, key: str, build):
        """``build()`` once per step, kept in ``per_step`` (a ``None`` result is not kept).
        Metadata without host lists is reused across replays with new device values (as
        graphs do): never cached there."""
        value = self.per_step.get(key) if self.seq_lens_cpu is not None else None
        if value is None:
            value = build()
            if value is not None and self.seq_lens_cpu is not None:
                self.per_step[key] = value
        return value

    def tree_rows(self) -> list[int] | None:
        """The tree mask on the host (one device read per step at most), None without one."""
        if self.tree_mask is None:
            return None
        if self.tree_mask_cpu is not None:
            return self.tree_mask_cpu
        return self.step_cached("tree_mask_cpu", self.tree_mask.tolist)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


TREE_WINDOW = 64  # keys a tree-mask row can address (the last 64 of its sequence)


def tree_mask_row(kv_len: int, prefix_end: int, visible: "list[int] | tuple[int, ...]") -> int:
    """One ``tree_mask`` value (int64 range) for a token of a sequence holding ``kv_len`` keys
    after the step: it sees every key below ``prefix_end`` and the keys ``visible`` (KV indices
    in ``[prefix_end, kv_len)``, itself included). Raises ``ValueError`` if a visible key lies
    outside the last ``TREE_WINDOW`` keys."""
    base = kv_len - TREE_WINDOW
    bits = (1 << (prefix_end - base)) - 1 if prefix_end > base else 0
    for j in visible:
        if not base <= j < kv_len:
            raise ValueError(f"tree key {j} outside the window [{base}, {kv_len})")
        bits |= 1 << (j - base)
    bits &= (1 << TREE_WINDOW) - 1
    return bits - (1 << TREE_WINDOW) if bits >> (TREE_WINDOW - 1) else bits


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The paged layout, host side: the cache slot of a sequence's token at ``position``."""
    return block_table[position // block_size] * block_size + position % block_size


def cache_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """``[cache_slot(p) for p in range(start, end)]``, one run per block (for long chunks)."""
    out: list[int] = []
    p = start
    while p < end:
        block, off = divmod(p, block_size)
        n = min(block_size - off, end - p)
        base = block_table[block] * block_size + off
        out.extend(range(base, base + n))
        p += n
    return out


def context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """The same layout on the device: slots [B, length] (int64) of positions ``0 .. length-1``
    of each row of ``block_tables`` [B, max_blocks] (rows shorter than ``length`` read padding)."""
    pos = torch.arange(length, device=block_tables.device)
    return block_tables[:, pos // block_size].long() * block_size + pos % block_size


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    global _current
    prev, _current = _current, meta
    try:
        yield meta
    finally:
        _current = prev


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside a forward_context")
    return _current
