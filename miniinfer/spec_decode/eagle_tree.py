"""EAGLE-2 dynamic draft trees (Li et al., "EAGLE-2: Faster Inference of Language Models with
Dynamic Draft Trees", 2024), grown by the EAGLE head from the root's output.

With ``K = eagle_topk`` and depth ``D = num_speculative_tokens``, per sequence:

* **expand**: the root (the last known token; the head's catch-up gave its output ``h``)
  proposes its top K tokens: the depth-1 frontier, each scored by its log-probability. At each
  depth d < D the head runs once over the K frontier nodes (each fed its token and its
  parent's output), every node proposes its top K children (score = parent's score + log p),
  and the K best of those K² children by score become the next frontier. Every proposed node
  joins the candidate pool, expanded or not.
* **grammar** (``grammar_draft.py``): for a constrained sequence the proposals at every depth
  are taken among the tokens its grammar allows after the node's path.
* **rerank**: the tree is the ``num_draft_tokens`` best candidates of the pool. A child's score
  is never above its parent's (a small per-depth penalty breaks exact ties), so the choice is
  closed under ancestors: a tree. Nodes go out breadth-first (parents before children), as the
  verify wants them.

The head's own K/V for tree nodes lives past the sequence's known tokens: frontier node j of
depth d at KV index ``P + (d - 1) K + j`` (P = known tokens), seen through a tree mask (the
cached prefix, its ancestors, itself; ``attention/metadata.py``). Those slots are scratch: the
next catch-up rewrites positions from P on. With K = 1 the tree is a chain and the steps are
plain one-token decodes (CUDA graphs of the decode family).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.attention.metadata import cache_slot, tree_mask_row
from miniinfer.engine.sequence import Sequence
from miniinfer.worker.input_batch import InputBatch, meta_from_lists

DEPTH_TIE_BREAK = 1e-4  # subtracted per depth from a candidate's score, for the rerank only


@dataclass
class DraftTree:
    tokens: list[int]  # breadth-first
    parents: list[int]  # index into tokens, or -1 for the root (the sequence's last token)


class _Frontier:
    """The nodes the head runs next, [B, K] each (device), with their host-side KV places."""

    def __init__(self, pool_index, scores, tokens, feats, ancestors):
        self.pool_index = pool_index  # [B, K] int64: index in the candidate pool
        self.scores = scores  # [B, K] float32: cumulative log-probabilities
        self.tokens = tokens  # [B, K] int64
        self.feats = feats  # [B, K, H]: the parent's head output
        self.ancestors = ancestors  # host [B][K]: KV indices of each node's tree ancestors


def grow_trees(drafter, seqs: list[Sequence], depths: list[int], num_nodes: list[int],
               root_h: torch.Tensor) -> list[DraftTree]:
    """One tree per sequence. ``depths[b]`` ≥ 1 and ``num_nodes[b]`` ≥ 1 bound sequence b's
    tree; ``root_h`` [B, H] is the head's output at each sequence's last token. The head's
    K/V cache must have blocks through ``P + (max depth - 1) K`` for each sequence."""
    K = drafter.config.eagle_topk
    B, D = len(seqs), max(depths)
    dev = root_h.device
    grammar = drafter.grammar_mask()
    allowed = grammar.rows(seqs, [[[]] for _ in seqs]) if grammar is not None else None
    logp, ids = drafter.top_tokens(root_h, K, None if allowed is None else grammar.expand(allowed[:, 0], dev))  # [B, K]
    paths = [[[t] for t in row] for row in ids.tolist()] if allowed is not None else None  # frontier paths
    pool_scores, pool_tokens, pool_parents = [logp], [ids], [torch.full((B, K), -1, dtype=torch.int64, device=dev)]
    pool_depth = [torch.ones(B, K, device=dev)]
    front = _Frontier(torch.arange(K, device=dev).expand(B, K), logp, ids,
                      root_h[:, None, :].expand(B, K, root_h.shape[-1]), [[[] for _ in range(K)] for _ in range(B)])
    size = K
    too_deep = torch.tensor([[d] for d in depths], device=dev)
    for depth in range(1, D):
        h = _head_step(drafter, seqs, front, depth, [b for b in range(B) if depths[b] > depth])  # [B * K, H]
        allowed = grammar.rows(seqs, paths) if paths is not None else None
        mask = None if allowed is None else grammar.expand(allowed.view(B * K, -1), dev)
        clp, cids = drafter.top_tokens(h, K, mask)  # [B * K, K]
        scores = (front.scores[:, :, None] + clp.view(B, K, K)).view(B, K * K)
        scores = scores.masked_fill(too_deep <= depth, float("-inf"))  # past a sequence's own depth
        tokens = cids.view(B, K * K)
        pool_scores.append(scores)
        pool_tokens.append(tokens)
        pool_parents.append(front.pool_index[:, :, None].expand(B, K, K).reshape(B, K * K))
        pool_depth.append(torch.full((B, K * K), depth + 1.0, device=dev))
        best = scores.topk(K, dim=1)
        parent_j = best.indices // K
        kv = [[s.num_tokens + (depth - 1) * K + j for j in range(K)] for s in seqs]
        chosen = tokens.gather(1, best.indices)
        if paths is None:  # a chain's frontier is its only node: no device read per depth
            parent_host = [[0]] * B if K == 1 else parent_j.tolist()
        else:
            parent_host, chosen_host = torch.stack([parent_j, chosen]).tolist()  # one copy
            paths = [[paths[b][p] + [t] for p, t in zip(parent_host[b], chosen_host[b])] for b in range(B)]
        ancestors = [[front.ancestors[b][p] + [kv[b][p]] for p in parent_host[b]] for b in range(B)]
        feats = h.view(B, K, -1).gather(1, parent_j[:, :, None].expand(B, K, h.shape[-1]))
        front = _Frontier(size + best.indices, best.values, chosen, feats, ancestors)
        size += K * K
    return _rerank(torch.cat(pool_scores, 1), torch.cat(pool_tokens, 1), torch.cat(pool_parents, 1),
                   torch.cat(pool_depth, 1), num_nodes)


def _head_step(drafter, seqs: list[Sequence], front: _Frontier, depth: int, active: list[int]) -> torch.Tensor:
    """The head over the frontier nodes of depth ``depth`` of the ``active`` sequences (those
    whose own depth goes further: the others' cache has no room past it); returns the
    outputs [B K, H], zeros for the rows of inactive sequences (their children are masked)."""
    B, K = front.tokens.shape
    bs = drafter.block_size
    q_lens, seq_lens, tables, slots, positions, masks = [], [], [], [], [], []
    for b in active:
        s = seqs[b]
        P = s.num_tokens
        first = P + (depth - 1) * K
        L = first + K
        q_lens.append(K)
        seq_lens.append(L)
        tables.append(s.block_table)
        slots.extend(cache_slot(s.block_table, first + j, bs) for j in range(K))
        positions.extend([P - 1 + depth] * K)
        if K > 1:
            masks.extend(tree_mask_row(L, P, front.ancestors[b][j] + [first + j]) for j in range(K))
    dev = front.tokens.device
    rows = torch.tensor(active, device=dev)
    meta = meta_from_lists(q_lens, seq_lens, tables, torch.tensor(slots, dtype=torch.int64, device=dev),
                           len(active) if K == 1 else 0, dev)
    if K > 1:
        meta.tree_mask_cpu = masks
        meta.tree_mask = torch.tensor(masks, dtype=torch.int64, device=dev)
    T = len(slots)
    batch = InputBatch(front.tokens[rows].reshape(T), torch.tensor(positions, dtype=torch.int64, device=dev), meta,
                       torch.arange(T, device=dev), [], None, None)
    h = drafter.head_forward(batch, len(active), front.feats[rows].reshape(T, -1))
    if len(active) == B:
        return h
    out = torch.zeros(B, K, h.shape[-1], dtype=h.dtype, device=dev)
    out[rows] = h.view(len(active), K, -1)
    return out.view(B * K, -1)


def rerank_device(scores, tokens, parents, depth, n: int) -> torch.Tensor:
    """The ``n`` best candidates of each row's pool (device): [5, B, n] int64 of (pool index,
    token, parent's pool index, depth, finite score?), best first."""
    key = scores - DEPTH_TIE_BREAK * depth
    chosen = key.topk(min(n, key.shape[1]), dim=1).indices
    return torch.stack([chosen, tokens.gather(1, chosen), parents.gather(1, chosen),
                        depth.gather(1, chosen).long(), torch.isfinite(scores.gather(1, chosen)).long()])


def trees_from_rerank(packed: list, num_nodes: list[int], depths: list[int] | None = None) -> list[DraftTree]:
    """``rerank_device``'s output on the host → each row's first ``num_nodes[b]`` candidates
    (of those no deeper than ``depths[b]``, when given) as a breadth-first tree (a node whose
    parent was not chosen goes, with its subtree)."""
    idx, tok, par, dep, finite = packed
    n = len(idx[0]) if idx else 0
    trees = []
    for b, limit in enumerate(num_nodes):
        if depths is None:
            ranked = [j for j in range(min(limit, n)) if finite[b][j]]
        else:
            ranked = [j for j in range(n) if finite[b][j] and dep[b][j] <= depths[b]][:limit]
        nodes = sorted(ranked, key=lambda j: (dep[b][j], idx[b][j]))
        where: dict[int, int] = {}
        kept_tok, kept_par = [], []
        for j in nodes:  # breadth-first: a parent is placed before its children, or was not chosen
            p = par[b][j]
            if p >= 0 and p not in where:
                continue  # (only float ties can drop a parent: then its subtree goes too)
            where[idx[b][j]] = len(kept_tok)
            kept_tok.append(tok[b][j])
            kept_par.append(where[p] if p >= 0 else -1)
        trees.append(DraftTree(kept_tok, kept_par))
    return trees


def _rerank(scores, tokens, parents, depth, num_nodes: list[int]) -> list[DraftTree]:
    """Each sequence's ``num_nodes`` best candidates, breadth-first, as a tree."""
    return trees_from_rerank(rerank_device(scores, tokens, parents, depth, max(num_nodes)).tolist(), num_nodes)
