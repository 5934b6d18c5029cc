"""The static EAGLE-2 tree program (``eagle_tree_static.py``, what the GPU captures per batch
bucket) grows the same trees as the host-built ``grow_trees``, writes no K/V for padding rows,
and gives the greedy output of plain decoding."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from miniinfer import LLM, SamplingParams
from miniinfer.spec_decode.eagle_tree import grow_trees

TREE = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 3, "num_draft_tokens": 8}
PROMPTS = ("Write a short story about a robot.", "List five fruits and their colors.",
           "def add(a, b):\n    return a + b\n# now multiply:")


@pytest.fixture(scope="module")
def tree_llm():
    return LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=TREE)


def _prompts(llm):
    return [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in PROMPTS]


def test_static_trees_equal_host_built_trees(tree_llm):
    drafter = tree_llm.engine.proposer
    static = drafter.static
    calls = []
    orig = static.grow

    def both(tables, num_tokens, root_h, allowed=None, depths=None, num_nodes=None):
        assert allowed is None  # no grammar here
        got = orig(tables, num_tokens, root_h, depths=depths, num_nodes=num_nodes)
        seqs = [SimpleNamespace(num_tokens=n, block_table=t, grammar=None) for t, n in zip(tables, num_tokens)]
        want = grow_trees(drafter, seqs, depths, num_nodes, root_h)
        calls.append((len(seqs), min(depths), [(t.tokens, t.parents) for t in got] == [(t.tokens, t.parents) for t in want]))
        return got
    static.grow = both
    try:  # different max_tokens: sequences near their end draft shallower trees beside full ones
        tree_llm.generate(_prompts(tree_llm), [SamplingParams(temperature=0, max_tokens=m) for m in (24, 7, 13)],
                          use_tqdm=False)
    finally:
        static.grow = orig
    assert len(calls) > 3 and any(b == 3 for b, _, _ in calls)  # batched steps were compared
    assert any(d < static.D for _, d, _ in calls)  # budgets near max_tokens: trees cut to them
    assert all(same for _, _, same in calls)


def test_padding_rows_write_no_kv(tree_llm):
    """Rows past the live batch (a graph bucket's padding) must not touch the head's cache."""
    drafter = tree_llm.engine.proposer
    static = drafter.static
    h = torch.randn(3, drafter.hidden_size)
    P = torch.tensor([40, 57, 1])
    tables = torch.tensor([[5, 6, 7, 8, 13], [9, 10, 11, 12, 14], [0, 0, 0, 0, 0]], dtype=torch.int32)
    before = drafter.head.kv_caches.clone()
    live = torch.tensor([True, True, False])
    padded = static.program(3, P, tables, live, h)
    block0 = drafter.head.kv_caches[:, :, 0]
    assert torch.equal(block0, before[:, :, 0])  # the padding row's table points at block 0
    assert not torch.equal(drafter.head.kv_caches[:, :, 5:15], before[:, :, 5:15])  # live rows wrote
    alone = static.program(2, P[:2], tables[:2], live[:2], h[:2])
    assert torch.equal(padded[:, :2], alone)


def test_greedy_identical_with_static_trees(tree_llm, smol_llm):
    params = SamplingParams(temperature=0, max_tokens=32)
    want = [o.outputs[0].token_ids for o in smol_llm.generate(_prompts(tree_llm), params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tree_llm.generate(_prompts(tree_llm), params, use_tqdm=False)]
    assert got == want
