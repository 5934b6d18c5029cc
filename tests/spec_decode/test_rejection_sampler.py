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


def _run(logits_rows: torch.Tensor, drafts: list[list[int]], temperature: float, copies: int, seed: int = 0):
    """``copies`` identical sequences, each verifying ``drafts[0]`` against ``logits_rows``."""
    k = len(drafts[0])
    seqs = [Sequence(f"r{i}", 0, [0], 1, SamplingParams(temperature=temperature)) for i in range(copies)]
    row_seqs = [s for s in seqs for _ in range(k + 1)]
    md = SamplingMetadata.build(row_seqs, V, torch.device("cpu"))
    logits = logits_rows.repeat(copies, 1)
    draft_ids = torch.tensor((drafts[0] + [-1]) * copies)
    index = torch.arange(copies * (k + 1)).view(copies, k + 1)
    rows = [range(i * (k + 1), (i + 1) * (k + 1)) for i in range(copies)]
    g = torch.Generator().manual_seed(seed)
    return rejection_sample(logits, md, draft_ids, index, rows, [None] * copies, g)


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
