"""The rejection sampler is lossless: over many draws, the committed tokens follow the target
distribution whatever the drafts are (chi-square over a small vocabulary); greedy rows accept
exactly the argmax prefix."""
from __future__ import annotations

import torch

from miniinfer.engine.sequence import Sequence
from miniinfer.sample import SamplingMetadata
from miniinfer.sampling_params import SamplingParams
from miniinfer.spec_decode.rejection_sampler import rejection_sample

V = 6
CHI2_CRIT = 20.52  # chi-square, V - 1 = 5 degrees of freedom, p = 0.001


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _run(logits_rows: torch.Tensor, drafts: list[list[int]], temperature: float, copies: int, seed: int = 0,
         parents: list[int] | None = None):
    """``copies`` identical sequences, each verifying the drafts ``drafts[0]`` (a chain, or the
    tree of ``parents``: draft j's parent, -1 = the root) against ``logits_rows``."""
    k = len(drafts[0])
    parents = list(range(-1, k - 1)) if parents is None else parents
    seqs = [Sequence(f"r{i}", 0, [0], 1, SamplingParams(temperature=temperature)) for i in range(copies)]
    row_seqs = [s for s in seqs for _ in range(k + 1)]
    md = SamplingMetadata.build(row_seqs, V, torch.device("cpu"))
    logits = logits_rows.repeat(copies, 1)
    node_tokens = torch.tensor(([-1] + drafts[0]) * copies)
    base = torch.arange(copies)[:, None] * (k + 1)
    parent_rows = base + torch.tensor([0] + [p + 1 for p in parents])  # draft j's parent: row p + 1
    parent_rows[:, 0] = -1  # the root
    parent_rows = parent_rows.view(-1)
    index = torch.arange(copies * (k + 1)).view(copies, k + 1)
    rows = [range(i * (k + 1), (i + 1) * (k + 1)) for i in range(copies)]
    g = torch.Generator().manual_seed(seed)
    return rejection_sample(logits, md, node_tokens, parent_rows, index, rows, None, g)


def test_first_token_follows_target_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 1.5
    p0 = logits[0].softmax(-1)
    n = 40_000
    for draft in ([2, 4], [int(p0.argmax()), 1], [5, 5]):
        out = _run(logits, [draft], 1.0, n)
        first = out.token_ids[:, 0]
        counts = torch.bincount(first, minlength=V).double()
        expected = p0.double() * n
        assert chi2(counts, expected) < CHI2_CRIT, (draft, counts, expected)


def test_second_token_conditional_distribution():
    """Given the first token equals the draft, the second follows row 1's distribution."""
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    n = 60_000
    out = _run(logits, [[3, 0]], 1.0, n)
    both = out.token_ids[out.token_ids[:, 0] == 3][:, 1]
    counts = torch.bincount(both, minlength=V).double()
    expected = logits[1].softmax(-1).double() * len(both)
    assert chi2(counts, expected) < CHI2_CRIT, (counts, expected)


def test_temperature_scales_the_target():
    torch.manual_seed(2)
    logits = torch.randn(2, V) * 2
    n = 40_000
    out = _run(logits, [[1]], 0.5, n)
    counts = torch.bincount(out.token_ids[:, 0], minlength=V).double()
    expected = (logits[0] / 0.5).softmax(-1).double() * n
    assert chi2(counts, expected) < CHI2_CRIT, (counts, expected)


def test_greedy_accepts_the_argmax_prefix():
    logits = torch.full((4, V), -1.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 5.0
    out = _run(logits, [[2, 3, 0]], 0.0, 1)
    assert out.token_ids[0].tolist() == [2, 3, 1, -1] and out.num_tokens.tolist() == [3]
    out = _run(logits, [[2, 3, 1]], 0.0, 1)  # all accepted: the bonus token too
    assert out.token_ids[0].tolist() == [2, 3, 1, 4] and out.num_tokens.tolist() == [4]
    out = _run(logits, [[0, 3, 1]], 0.0, 1)
    assert out.token_ids[0].tolist() == [2, -1, -1, -1] and out.num_tokens.tolist() == [1]


# A tree: the root has children 2 (draft 0) and 4 (draft 1); draft 0 has child 1 (draft 2).
TREE_DRAFTS, TREE_PARENTS = [2, 4, 1], [-1, -1, 0]


def test_tree_first_token_follows_target_distribution():
    torch.manual_seed(3)
    logits = torch.randn(4, V) * 1.5
    n = 40_000
    out = _run(logits, [TREE_DRAFTS], 1.0, n, parents=TREE_PARENTS)
    counts = torch.bincount(out.token_ids[:, 0], minlength=V).double()
    expected = logits[0].softmax(-1).double() * n
    assert chi2(counts, expected) < CHI2_CRIT, (counts, expected)


def test_tree_second_token_follows_the_accepted_branch():
    """After token 2 (draft 0) the next token follows row 1 (draft 0's row); after token 4
    (draft 1, a leaf) it follows row 2 and is always the last committed token."""
    torch.manual_seed(4)
    logits = torch.randn(4, V)
    n = 80_000
    out = _run(logits, [TREE_DRAFTS], 1.0, n, parents=TREE_PARENTS)
    for first, row in ((2, 1), (4, 2)):
        sel = out.token_ids[:, 0] == first
        second = out.token_ids[sel][:, 1]
        counts = torch.bincount(second, minlength=V).double()
        expected = logits[row].softmax(-1).double() * int(sel.sum())
        assert chi2(counts, expected) < CHI2_CRIT, (first, counts, expected)
    after_leaf = out.token_ids[out.token_ids[:, 0] == 4]
    assert (after_leaf[:, 2] == -1).all() and (out.num_tokens[out.token_ids[:, 0] == 4] == 2).all()
    path = out.paths[out.token_ids[:, 0] == 4][0].tolist()
    assert path == [0, 2, -1, -1]  # the root's row, then draft 1's


def test_tree_greedy_walks_the_argmax_branch():
    logits = torch.full((4, V), -1.0)
    for row, best in enumerate([2, 1, 3, 5]):  # root -> 2, draft 0 -> 1, draft 1 -> 3, draft 2 -> 5
        logits[row, best] = 5.0
    out = _run(logits, [TREE_DRAFTS], 0.0, 1, parents=TREE_PARENTS)
    assert out.token_ids[0].tolist() == [2, 1, 5, -1] and out.num_tokens.tolist() == [3]
    assert out.paths[0].tolist() == [0, 1, 3, -1]
    logits[0] = -1.0
    logits[0, 4] = 5.0  # the root now prefers 4: the leaf branch, then draft 1's argmax
    out = _run(logits, [TREE_DRAFTS], 0.0, 1, parents=TREE_PARENTS)
    assert out.token_ids[0].tolist() == [4, 3, -1, -1] and out.paths[0].tolist() == [0, 2, -1, -1]


def test_host_walk_equals_device_walk():
    """``accept_paths`` (the runner's walk on the host from ``draw_rows``) commits the same tokens
    along the same paths as ``rejection_sample``'s device walk, over random trees and draws."""
    from miniinfer.spec_decode.rejection_sampler import accept_paths, draw_rows
    gen = torch.Generator().manual_seed(3)
    longest = 0
    for trial in range(40):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        parents = [-1] + [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(1, n)]
        # siblings carry distinct tokens (a deterministic drafter's children); small vocabulary: many hits
        tokens, used = [], {}
        for p in parents:
            free = [t for t in range(V) if t not in used.setdefault(p, set())]
            t = free[int(torch.randint(0, len(free), (1,), generator=gen))]
            used[p].add(t)
            tokens.append(t)
        logits = torch.randn(n + 1, V, generator=gen) * 3
        temperature = 0.0 if trial % 2 else 1.0
        device = _run(logits, [tokens], temperature, 2, seed=trial, parents=parents)
        seqs = [Sequence(f"r{i}", 0, [0], 1, SamplingParams(temperature=temperature)) for i in range(2)]
        md = SamplingMetadata.build([s for s in seqs for _ in range(n + 1)], V, torch.device("cpu"))
        drawn = draw_rows(logits.repeat(2, 1), md, None, torch.Generator().manual_seed(trial))
        committed, paths = accept_paths(drawn.tolist(), [tokens] * 2, [parents] * 2,
                                        [range(0, n + 1), range(n + 1, 2 * n + 2)])
        for b in range(2):
            k = int(device.num_tokens[b])
            assert committed[b] == device.token_ids[b, :k].tolist()
            assert paths[b] == device.paths[b, :k].tolist()
            longest = max(longest, k)
    assert longest >= 3  # drafts were accepted, some two deep
