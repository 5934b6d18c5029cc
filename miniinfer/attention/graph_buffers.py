"""Static attention metadata for CUDA-graph capture and replay of paged attention.

A captured graph reads its inputs from fixed addresses, so every replay copies the step's
metadata into the same buffers. Two families share them (the runner's ``worker/cuda_graphs.py``
owns the graphs, the attention backend owns these buffers):

* ``"decode"``: ``size`` sequences × 1 token. Rows past the live batch are padding: slot −1
  (no K/V write) and length 1 (they attend over one token of block 0; nobody reads them).
* ``"prefill"``: one sequence's chunk of up to ``size`` tokens. Tokens past the chunk have
  slot −1 and lie outside the sequence's query range. Captured with a tree mask (all −1), so
  a replay serves both a plain chunk (its rows −1: the causal path) and a batch-1 draft-tree
  verify (``meta.tree_mask`` copied in); the decode family has none.
* ``"verify"``: up to ``size`` sequences of at most ``rows`` tokens each (a speculative verify
  of several sequences: the last token and the drafts), ``size * rows`` token rows in all, a
  tree mask like the prefill family. Padding sequences have no tokens (their
  ``query_start_loc`` entries repeat the last real one) and length 1; padding tokens belong to
  no sequence and have slot −1.

A backend whose metadata has more subclasses this and extends
``capture_metadata`` / ``prepare_replay``.
"""
from __future__ import annotations

import torch

from miniinfer.attention.metadata import AttentionMetadata


class GraphBuffers:
    def __init__(self, max_seqs: int, max_tokens: int, max_blocks: int, max_seq_len: int,
                 device: torch.device):
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.max_seq_len = max_seq_len
        self.slots = torch.full((max(max_seqs, max_tokens),), -1, **i64)  # [T] slot_mapping
        self.seq_lens = torch.ones(max_seqs, **i32)  # [B]
        self.block_tables = torch.zeros(max_seqs, max_blocks, **i32)  # [B, max_blocks]
        self.decode_qsl = torch.arange(max_seqs + 1, **i32)  # [B + 1]: one token per sequence
        self.prefill_qsl = torch.zeros(2, **i32)  # [2]: one sequence
        self.verify_qsl = torch.zeros(max_seqs + 1, **i32)  # [B + 1]: several sequences, q_len <= rows
        self.tree_mask = torch.full((max(max_seqs, max_tokens),), -1, **i64)  # [T], -1: causal row
        self._tree_rows = 0  # rows [0, _tree_rows) may hold bits other than -1

    def capture_metadata(self, kind: str, size: int, rows: int = 0) -> AttentionMetadata:
        """Metadata views over the buffers for a graph of ``size`` sequences (decode; verify, of
        up to ``rows`` tokens each) or tokens (prefill); ``max_seq_len`` is the capture-time
        upper bound, so one graph serves any length."""
        if kind == "verify":
            t = size * rows
            self.verify_qsl[:size + 1] = torch.arange(0, t + 1, rows, dtype=torch.int32)
            self.seq_lens[:size] = rows
            return AttentionMetadata(
                num_decodes=0, num_decode_tokens=0, query_start_loc=self.verify_qsl[:size + 1],
                seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
                slot_mapping=self.slots[:t], max_query_len=rows, max_seq_len=self.max_seq_len,
                tree_mask=self.tree_mask[:t])
        if kind == "decode":
            return AttentionMetadata(
                num_decodes=size, num_decode_tokens=size, query_start_loc=self.decode_qsl[:size + 1],
                seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
                slot_mapping=self.slots[:size], max_query_len=1, max_seq_len=self.max_seq_len)
        self.prefill_qsl[1] = size
        self.seq_lens[0] = size
        return AttentionMetadata(
            num_decodes=0, num_decode_tokens=0, query_start_loc=self.prefill_qsl,
            seq_lens=self.seq_lens[:1], block_tables=self.block_tables[:1],
            slot_mapping=self.slots[:size], max_query_len=size, max_seq_len=self.max_seq_len,
            tree_mask=self.tree_mask[:size])

    def prepare_replay(self, kind: str, size: int, meta: AttentionMetadata, rows: int = 0) -> None:
        """Copy a live step's metadata (``n`` real rows / tokens ≤ ``size``; verify: ``b`` ≤
        ``size`` sequences, n ≤ ``size * rows`` tokens) in and pad the rest."""
        n = meta.slot_mapping.shape[0]
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:size * rows if kind == "verify" else size].fill_(-1)
        b = meta.seq_lens.shape[0]
        self.seq_lens[:b].copy_(meta.seq_lens)
        if kind == "decode":
            self.seq_lens[b:size].fill_(1)
        elif kind == "verify":
            self.seq_lens[b:size].fill_(1)
            self.verify_qsl[:b + 1].copy_(meta.query_start_loc)
            self.verify_qsl[b + 1:size + 1].fill_(n)  # padding sequences: no tokens
            self._replay_tree_mask(n, meta)
        else:
            self.prefill_qsl.copy_(meta.query_start_loc)
            self._replay_tree_mask(n, meta)
        self.block_tables[:b, :meta.block_tables.shape[1]].copy_(meta.block_tables)

    def _replay_tree_mask(self, n: int, meta: AttentionMetadata) -> None:
        """The step's tree mask over rows [0, n), -1 everywhere else (rows past the last
        replay's are -1 already: a plain chunk after a plain chunk writes nothing)."""
        if meta.tree_mask is not None:
            self.tree_mask[:n].copy_(meta.tree_mask[:n])
            if self._tree_rows > n:
                self.tree_mask[n:self._tree_rows].fill_(-1)
            self._tree_rows = n
        elif self._tree_rows:
            self.tree_mask[:self._tree_rows].fill_(-1)
            self._tree_rows = 0

    def after_replay(self, kind: str) -> None:
        if kind == "prefill":
            self.seq_lens[:1].fill_(1)

    def reset(self) -> None:
        """After capture: every row back to the padding state."""
        self.seq_lens.fill_(1)
        self.tree_mask.fill_(-1)
        self._tree_rows = 0


class PagedAttentionBase:
    """What every paged backend shares: the default CUDA-graph buffers, and the per-tensor
    scales of an FP8 KV cache (floats, value = fp8 * scale; ``worker/kv_cache.py`` sets them
    when it allocates an fp8 cache; 1.0 is vLLM's default without calibration). Ignored for
    other cache dtypes."""

    k_scale: float = 1.0
    v_scale: float = 1.0

    def make_graph_buffers(self, max_seqs: int, max_tokens: int, max_blocks: int, max_seq_len: int,
                           device: torch.device) -> GraphBuffers:
        return GraphBuffers(max_seqs, max_tokens, max_blocks, max_seq_len, device)
