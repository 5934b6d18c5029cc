"""EAGLE-2 tree growth with static shapes and no host reads: one CUDA graph per batch bucket.

``eagle_tree.grow_trees`` builds each head step's attention metadata on the host (Python lists
of slots, positions and ancestor bits) and reads the chosen parents back after every depth:
per depth a few dozen small ops and a device-to-host wait, most of a verify step on the GPU
for a 135M target. Here the same expansion runs as tensor ops only, so it can be captured:

* every sequence grows a full tree: depth ``D = num_speculative_tokens``, ``K = eagle_topk``
  branches, ``N = num_draft_tokens`` nodes; a sequence whose budget is shallower (near
  ``max_tokens``) keeps the best nodes within it (a child never outscores its parent, so that
  is still a tree, the one ``grow_trees`` would grow);
* grammar-aware drafting masks the root's children only (``root_allowed``: the tokens the
  request's grammar allows now, one row per sequence, all True without a grammar); deeper
  proposals are unmasked here (their rows depend on the chosen paths: a host walk per depth).
  The verify masks every node either way, so what is accepted is grammatical;
* head step d (1 ≤ d < D) runs over the K frontier nodes of depth d at KV indices
  ``P + (d−1)K + j`` (P = the sequence's known tokens), position ``P − 1 + d``; slots come from
  the block table on the device; each node's tree-mask row is the prefix bits plus its
  ancestors' and its own bit (``attention/metadata.py``: the window is the last 64 keys, the
  tree part is the last dK of them), built from a [B, K, dK] visibility matrix gathered along
  the chosen parents;
* the rerank (best N by score, ancestors first) ends on the device as one [5, B, N] int64
  tensor, the only thing read back (``eagle_tree.trees_from_rerank``).

Identical trees to ``grow_trees`` (same ops, same order; ``tests/spec_decode``). Batches above
the largest bucket, and the CPU, run the same function eagerly.
"""
from __future__ import annotations

import torch

from miniinfer.attention.metadata import TREE_WINDOW, AttentionMetadata, forward_context
from miniinfer.spec_decode.eagle_tree import DraftTree, rerank_device, trees_from_rerank

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def device_slots(tables: torch.Tensor, kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """The paged layout on the device: cache slots (int64, ``kv``'s shape) of KV indices ``kv``
    [B, n] (int64) of the sequences whose block tables are ``tables`` [B, W] (int32)."""
    return tables.gather(1, (kv // block_size).to(torch.int64)).to(torch.int64) * block_size + kv % block_size


def _pow2_window(device) -> torch.Tensor:
    """[64] int64: the value of window bit i (bit 63 is the sign bit: −2^63)."""
    vals = [1 << i for i in range(TREE_WINDOW - 1)] + [-(1 << (TREE_WINDOW - 1))]
    return torch.tensor(vals, dtype=torch.int64, device=device)


class StaticTreeDrafter:
    """Grows EAGLE-2 trees with fixed K, D, N for the ``drafter`` (an ``EagleDrafter``): static
    input buffers for up to ``min(max_batch, 32)`` rows of ``max_blocks`` block-table entries, a graph
    per bucket once :meth:`capture` ran (CUDA), :meth:`grow` per step."""

    def __init__(self, drafter, max_batch: int, max_blocks: int):
        cfg = drafter.config
        self.drafter = drafter
        self.K, self.D, self.N = cfg.eagle_topk, cfg.num_speculative_tokens, cfg.max_draft_tokens
        dev = drafter.head.device
        self.device = dev
        self.block_size = drafter.block_size
        self.max_seq_len = drafter.max_model_len
        max_batch = self.max_batch = min(max_batch, GRAPH_BATCH_SIZES[-1])  # larger batches run eager, unstaged
        i64 = dict(dtype=torch.int64, device=dev)
        self.num_tokens = torch.zeros(max_batch, **i64)  # P per row
        self.live = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.root_h = torch.zeros(max_batch, drafter.hidden_size, dtype=drafter.head.dtype, device=dev)
        width = drafter.vocab_w.shape[0] if drafter.vocab_w is not None else drafter.vocab_size
        self.root_allowed = torch.ones(max_batch, width, dtype=torch.bool, device=dev)
        self.depth_limit = torch.full((max_batch,), self.D, **i64)  # each row's depth budget
        self.pow2 = _pow2_window(dev)
        self.graphs: dict[int, tuple] = {}  # bucket -> (replay, packed output)
        self._masked = 0  # rows of root_allowed that may hold False

    # --- the tensor program ------------------------------------------------------------
    def _meta(self, B: int, d: int, P: torch.Tensor, tables: torch.Tensor, live: torch.Tensor,
              vis: torch.Tensor | None) -> tuple[AttentionMetadata, torch.Tensor]:
        """Head step d's metadata for B sequences × K frontier nodes, and the positions [B K]."""
        K, bs, dev = self.K, self.block_size, self.device
        kv = (P + (d - 1) * K)[:, None] + torch.arange(K, device=dev)  # [B, K] KV indices
        slots = device_slots(tables, kv, bs)
        slots = torch.where(live[:, None], slots, -1).reshape(-1)
        positions = (P - 1 + d)[:, None].expand(B, K).reshape(-1)
        seq_lens = (P + d * K).to(torch.int32)
        qsl = torch.arange(0, B * K + 1, K, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(num_decodes=B if K == 1 else 0, num_decode_tokens=B if K == 1 else 0,
                                 query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                 slot_mapping=slots, max_query_len=K, max_seq_len=self.max_seq_len)
        if K > 1:  # prefix bits (keys below P inside the window) + the visible tree keys
            width = d * K
            prefix = (1 << (TREE_WINDOW - width)) - 1
            meta.tree_mask = prefix + (vis.to(torch.int64) * self.pow2[TREE_WINDOW - width:]).sum(-1).reshape(-1)
        if not slots.is_cuda:  # the CPU paths loop over host lists
            meta.query_start_loc_cpu, meta.seq_lens_cpu = qsl.tolist(), seq_lens.tolist()
            if meta.tree_mask is not None:
                meta.tree_mask_cpu = meta.tree_mask.tolist()
        return meta, positions

    def program(self, B: int, P: torch.Tensor, tables: torch.Tensor, live: torch.Tensor,
                root_h: torch.Tensor, root_allowed: torch.Tensor | None = None,
                depth_limit: torch.Tensor | None = None) -> torch.Tensor:
        """The whole expansion and rerank for B rows → ``rerank_device``'s [5, B, n] int64.
        ``root_allowed`` [B, Vd] bool or None: the root's children are taken among those;
        ``depth_limit`` [B] int64 or None: nodes deeper than a row's limit are not ranked (its
        best n within the budget, not the best n overall cut to it)."""
        d_ = self.drafter
        K, D, dev = self.K, self.D, self.device
        logp, ids = d_.top_tokens(root_h, K, root_allowed)  # [B, K]
        pool_scores, pool_tokens = [logp], [ids]
        pool_parents = [torch.full((B, K), -1, dtype=torch.int64, device=dev)]
        pool_depth = [torch.ones(B, K, device=dev)]
        index = torch.arange(K, device=dev).expand(B, K)
        scores, tokens, feats = logp, ids, root_h[:, None, :].expand(B, K, root_h.shape[-1])
        own = torch.eye(K, dtype=torch.bool, device=dev).expand(B, K, K)
        vis = own  # [B, K, dK]: which tree keys (depth-major) each frontier node sees
        size = K
        for depth in range(1, D):
            meta, positions = self._meta(B, depth, P, tables, live, vis)
            with forward_context(meta):
                h = d_.head(d_.target.embed(tokens.reshape(-1)), feats.reshape(B * K, -1), positions)
            clp, cids = d_.top_tokens(h, K)  # [B K, K]
            child_scores = (scores[:, :, None] + clp.view(B, K, K)).view(B, K * K)
            child_tokens = cids.view(B, K * K)
            pool_scores.append(child_scores)
            pool_tokens.append(child_tokens)
            pool_parents.append(index[:, :, None].expand(B, K, K).reshape(B, K * K))
            pool_depth.append(torch.full((B, K * K), depth + 1.0, device=dev))
            best = child_scores.topk(K, dim=1)
            parent_j = best.indices // K
            tokens = child_tokens.gather(1, best.indices)
            feats = h.view(B, K, -1).gather(1, parent_j[:, :, None].expand(B, K, h.shape[-1]))
            vis = torch.cat([vis.gather(1, parent_j[:, :, None].expand(B, K, vis.shape[-1])), own], dim=2)
            index, scores = size + best.indices, best.values
            size += K * K
        all_scores, all_depth = torch.cat(pool_scores, 1), torch.cat(pool_depth, 1)
        if depth_limit is not None:
            all_scores = all_scores.masked_fill(all_depth > depth_limit[:, None], float("-inf"))
        return rerank_device(all_scores, torch.cat(pool_tokens, 1), torch.cat(pool_parents, 1), all_depth, self.N)

    # --- running it --------------------------------------------------------------------
    def bucket(self, B: int) -> int | None:
        return next((b for b in sorted(self.graphs) if b >= B), None)

    def grow(self, block_tables: list[list[int]], num_tokens: list[int], root_h: torch.Tensor,
             root_allowed: torch.Tensor | None = None, depths: list[int] | None = None,
             num_nodes: list[int] | None = None) -> list[DraftTree]:
        """One tree per sequence (at most N nodes, breadth-first). ``block_tables`` and
        ``num_tokens`` (P): each sequence's, whose head cache must have blocks through KV index
        ``P + (D − 1) K − 1``; ``root_h`` [B, H] the head's output at its last known token;
        ``root_allowed`` [B, Vd] bool (device) or None; ``depths`` / ``num_nodes``: each
        sequence's budget (default D and N): its tree is the best nodes no deeper than that,
        as ``grow_trees`` builds it. A graph replay when a bucket holds B rows, else the
        program eagerly; one device read either way."""
        B = len(num_tokens)
        bucket = self.bucket(B)
        if bucket is None:  # eager, on exactly B rows
            dev = self.device
            width = max(len(t) for t in block_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32, device=dev)
            P = torch.tensor(num_tokens, dtype=torch.int64, device=dev)
            limit = torch.tensor(depths or [self.D] * B, dtype=torch.int64, device=dev)
            packed = self.program(B, P, tables, torch.ones(B, dtype=torch.bool, device=dev), root_h, root_allowed,
                                  limit)
        else:
            self._stage(block_tables, num_tokens, root_h, bucket, root_allowed, depths)
            replay, out = self.graphs[bucket]
            replay()
            packed = out[:, :B]
        return trees_from_rerank(packed.tolist(), num_nodes or [self.N] * B, depths)

    def _stage(self, block_tables, num_tokens, root_h, bucket: int, root_allowed=None, depths=None) -> None:
        """Copy the step's rows into the static inputs (one staged host copy), pad the rest."""
        B = len(num_tokens)
        # only the widest live table's columns: a live row reads below its own length, a
        # padding row (P = 1) only its first columns, so older entries past them are never read
        width = min(max(len(t) for t in block_tables), self.block_tables.shape[1])
        staging = self.drafter.staging  # the catch-up's arena (pinned on CUDA): one copy, no wait
        dev_flat = staging.to_device(num_tokens + (depths or [self.D] * B)
                                     + [x for t in block_tables for x in t[:width] + [0] * (width - len(t))],
                                     torch.int64)
        staging.end_step()
        self.num_tokens[:B].copy_(dev_flat[:B])
        self.num_tokens[B:bucket].fill_(1)
        self.depth_limit[:B].copy_(dev_flat[B:2 * B])  # padding rows: outputs dropped
        self.live[:B].fill_(True)
        self.live[B:bucket].fill_(False)
        self.block_tables[:B, :width].copy_(dev_flat[2 * B:].view(B, width))
        self.root_h[:B].copy_(root_h)
        self.set_root_allowed(B, root_allowed)

    def set_root_allowed(self, B: int, root_allowed: torch.Tensor | None) -> None:
        """Rows ``:B`` of ``root_allowed`` from ``root_allowed`` [B, Vd] bool, or all True (None)."""
        if root_allowed is not None:
            self.root_allowed[:B].copy_(root_allowed)
            self._masked = max(self._masked, B)
        elif self._masked:  # rows a constrained step left behind
            self.root_allowed[:self._masked].fill_(True)
            self._masked = 0

    def capture(self, max_batch: int) -> None:
        """One graph per bucket of ``GRAPH_BATCH_SIZES`` up to ``max_batch`` (CUDA only)."""
        if self.device.type != "cuda":
            return
        pool = None
        for b in sorted((b for b in GRAPH_BATCH_SIZES if b <= min(max_batch, self.max_batch)), reverse=True):
            def run(b=b):
                return self.program(b, self.num_tokens[:b], self.block_tables[:b], self.live[:b], self.root_h[:b],
                                    self.root_allowed[:b], self.depth_limit[:b])
            self.live[:b].fill_(False)
            with torch.inference_mode():
                run()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = run()
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = (graph.replay, out)
        torch.cuda.synchronize()
