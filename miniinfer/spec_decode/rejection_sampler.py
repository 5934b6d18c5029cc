"""Verify drafts against the target model: lossless speculative sampling, over chains and trees.

A sequence verifies its last token (the root) and draft nodes, each node a token whose parent
is the root or an earlier node (a chain: parent = the previous draft; an EAGLE-2 tree: up to
``eagle_topk`` children per node). Row r of the logits is the target's distribution p_r of the
token after node r's path. Our drafters are deterministic (greedy heads, n-gram lookup), so
each draft is a point mass q = δ(d), and the children of a node carry distinct tokens. For one
point-mass draft, speculative sampling accepts d with probability p(d) and on rejection draws
from the residual norm(max(p − δ_d, 0)) = p without d (Leviathan et al., "Fast Inference from
Transformers via Speculative Decoding", 2023; Chen et al., 2023); over a node's distinct
children one after another (SpecInfer, Miao et al., 2024; EAGLE-2's tree verification), the
token emitted at a node is then distributed exactly as p_r: P(child c) = p_r(c), P(any other
token t) = p_r(t). So the sampler draws **one token s_r ~ p_r per row**, and walks from the
root: if a child of the current node carries s_r, it is accepted and the walk moves there;
otherwise s_r is the new (recovered or bonus) token and the walk stops. Greedy rows use the
argmax for s_r, so greedy output equals non-speculative greedy decoding. Grammar masks and
logits processors apply to every row before the draw (a forbidden child is never accepted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.engine.step import ScheduledSeq
from miniinfer.sample.metadata import SamplingMetadata
from miniinfer.sample.sampler import SamplerOutput, scaled_logits
from miniinfer.worker.input_batch import draft_depths


@dataclass
class SpecSamplerOutput:
    token_ids: torch.Tensor  # [B, W] int64: each sequence's committed tokens, then -1
    num_tokens: torch.Tensor  # [B] int64: accepted drafts + 1 (the recovered or bonus token)
    paths: torch.Tensor  # [B, W] int64: offsets (0 = root) of the accepted path's rows, then -1;
    # committed token j was drawn at row row_index[b, paths[b, j]]
    sampler_output: SamplerOutput | None  # logprobs of every row (row of committed token j of
    # sequence b = row_index[b, paths[b, j]]), when some row asked for them


def rejection_sample(logits: torch.Tensor, md: SamplingMetadata, node_tokens: torch.Tensor,
                     parent_rows: torch.Tensor, row_index: torch.Tensor, seq_rows: list[range],
                     row_seeds: list[int | None] | None = None,
                     generator: torch.Generator | None = None) -> SpecSamplerOutput:
    """``logits`` [R, V] float32 raw from the LM head, ``md`` over the same R rows (a
    sequence's parameters repeated on its rows). ``node_tokens`` [R] int64: the draft token of
    row r's node (-1 for a root); ``parent_rows`` [R] int64: the row of its parent (-1 for a
    root); ``row_index`` [B, W] int64: the rows of sequence b, root first, parents before
    children (-1 padding), ``seq_rows`` the same ranges on the host. ``row_seeds`` (seeded
    requests): per row, a seed for that row's draw, or None to draw from ``generator`` (or the
    device's default RNG when that is None or on another device). A seeded request gives each
    row the seed of the *position* it draws for (siblings share it), so what it samples at a
    position depends on the seed and the committed prefix only, never on the drafts."""
    if md.grammar_bitmask is not None:
        logits = md.grammar_bitmask.apply(logits)
    out = None
    if md.want_logprobs:
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(md.max_logprobs, dim=-1)
        out = SamplerOutput(torch.empty(0), top_logprobs=top.values, top_ids=top.indices)
    drawn = _draw(logits, md, row_seeds, generator)
    is_root = parent_rows < 0
    parent = torch.where(is_root, torch.arange(logits.shape[0], device=logits.device), parent_rows)
    accept = is_root | (node_tokens == drawn[parent])
    on_path = accept
    for _ in range(row_index.shape[1] - 1):  # a path is at most W - 1 nodes deep
        on_path = is_root | (accept & on_path[parent])
    valid = row_index >= 0
    safe_index = row_index.clamp(min=0)
    ok = on_path[safe_index] & valid  # [B, W]: the root and the accepted path, in row order
    W = row_index.shape[1]
    cols = torch.arange(W, device=logits.device)[None, :]
    paths = torch.sort(torch.where(ok, cols, W), dim=1).values  # path offsets first, ascending
    num_tokens = ok.long().sum(-1)  # accepted drafts + the root = committed tokens
    live = cols < num_tokens[:, None]
    paths = torch.where(live, paths, -1)
    path_rows = safe_index.gather(1, paths.clamp(min=0))  # [B, W]
    nxt = torch.cat([path_rows[:, 1:], path_rows[:, :1]], dim=1)  # row of the path's next node
    tokens = torch.where(cols + 1 < num_tokens[:, None], node_tokens[nxt], drawn[path_rows])
    tokens = torch.where(live, tokens, -1)
    if out is not None:
        R = logits.shape[0]
        row_token = torch.zeros(R + 1, dtype=torch.int64, device=logits.device)  # row R: a sink
        row_token.scatter_(0, torch.where(live, path_rows, R).view(-1), tokens.clamp(min=0).view(-1))
        row_token = row_token[:R]
        chosen = logprobs.gather(-1, row_token[:, None])
        out.sampled_logprob = chosen.squeeze(-1)
        out.sampled_rank = (logprobs > chosen).sum(-1) + 1
        out.token_ids = row_token
    return SpecSamplerOutput(tokens, num_tokens, paths, out)


def draw_rows(logits: torch.Tensor, md: SamplingMetadata, row_seeds: list[int | None] | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The first half of :func:`rejection_sample` alone: s_r for every row ([R] int64 on the
    logits' device; grammar masks and logits processors applied). With the drafts' trees on
    the host, :func:`accept_paths` then walks them there: fewer device ops per verify step
    than the device walk, for steps that need no logprobs."""
    if md.grammar_bitmask is not None:
        logits = md.grammar_bitmask.apply(logits)
    return _draw(logits, md, row_seeds, generator)


def accept_paths(drawn: list[int], drafts: list[list[int]], parents: list[list[int]],
                 seq_rows: list[range]) -> tuple[list[list[int]], list[list[int]]]:
    """The host twin of the walk in :func:`rejection_sample`. ``drawn``: s_r of every row;
    per sequence its draft tokens, their parents (node index, -1 = the root) and its rows
    (root first, node i at ``start + i + 1``). Returns per sequence the committed tokens and
    the accepted path's offsets (0 = root), one per committed token."""
    committed, paths = [], []
    for tokens, par, rows in zip(drafts, parents, seq_rows):
        children: dict[int, dict[int, int]] = {}
        for i, p in enumerate(par):
            children.setdefault(p, {}).setdefault(tokens[i], i)
        node, out, path = -1, [], [0]
        while True:
            s = drawn[rows.start + node + 1]
            out.append(s)
            child = children.get(node, {}).get(s)
            if child is None:
                break
            node = child
            path.append(child + 1)
        committed.append(out)
        paths.append(path)
    return committed, paths


def _draw(logits: torch.Tensor, md: SamplingMetadata, row_seeds, generator) -> torch.Tensor:
    for processor, state in md.processors:
        logits = processor.apply(logits, state)
    if md.processors:
        logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    drawn = logits.argmax(-1)  # s_r
    if not md.all_greedy:
        probs = scaled_logits(logits, md).softmax(-1)
        sampled = (probs / _row_noise(probs, row_seeds, generator)).argmax(-1)
        drawn = torch.where(md.greedy, drawn, sampled)
    return drawn


def _row_noise(probs: torch.Tensor, row_seeds: list[int | None] | None, generator) -> torch.Tensor:
    """Exponential noise [R, V] (argmax of probs / noise is a draw from probs); rows with a seed
    draw from a generator seeded with it (rows sharing a seed share the noise)."""
    noise = torch.empty_like(probs).exponential_(generator=_usable(generator, probs.device))
    by_seed: dict[int, list[int]] = {}
    for r, seed in enumerate(row_seeds or []):
        if seed is not None:
            by_seed.setdefault(seed, []).append(r)
    for seed, rows in by_seed.items():
        g = torch.Generator(device=probs.device).manual_seed(seed)
        one = torch.empty(probs.shape[-1], dtype=probs.dtype, device=probs.device).exponential_(generator=g)
        noise[rows] = one
    return noise


def _usable(generator, device) -> torch.Generator | None:
    return generator if generator is not None and generator.device == device else None


def position_seeds(verified: list[ScheduledSeq], parents: list[list[int]]) -> list[int | None] | None:
    """Per verify row, the seed of the position it draws for (a root at ``start`` draws for
    ``start + 1``, a depth-d node for ``start + d + 1``; a sampling prefill chunk of n tokens in
    the step for ``start + n``) when its request is seeded; None when no verifying request is."""
    if all(s.seq.params.seed is None for s in verified):
        return None
    out: list[int | None] = []
    for s, par in zip(verified, parents):
        if s.seq.params.seed is None:
            out.extend([None] * (len(par) + 1))
            continue
        base = (s.seq.params.seed + s.seq.index) * 1_000_003
        first = s.start + s.num_new_tokens - len(par)  # the root's position + 1 (a sampling prefill chunk: its end)
        out.extend((base + first + d) % 2 ** 63 for d in [0] + draft_depths(par))
    return out
