"""EAGLE-2 draft trees: the rerank keeps a tree (ancestors in, breadth-first); verify rows get
tree positions and masks; on the embedded SmolLM2 trees branch, paths through later branches
are accepted and their K/V moved into place: the prefix cache then serves them correctly."""
from __future__ import annotations

import torch

from helpers import check_clean
from miniinfer import LLM, SamplingParams
from miniinfer.attention.metadata import TREE_WINDOW
from miniinfer.spec_decode.eagle_tree import _rerank
from miniinfer.worker.input_batch import draft_depths, tree_mask_rows

TREE = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 3, "num_draft_tokens": 8}
GREEDY = SamplingParams(temperature=0, max_tokens=40)


def test_rerank_keeps_the_best_nodes_as_a_breadth_first_tree():
    # pool: 0,1 at depth 1; 2,3 children of 0; 4 child of 1; 5 child of 2 (depth 3)
    scores = torch.tensor([[-0.1, -0.5, -0.3, -2.0, -0.9, -0.35]])
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15]])
    parents = torch.tensor([[-1, -1, 0, 0, 1, 2]])
    depth = torch.tensor([[1.0, 1, 2, 2, 2, 3]])
    tree = _rerank(scores, tokens, parents, depth, [4])[0]
    assert tree.tokens == [10, 11, 12, 15] and tree.parents == [-1, -1, 0, 2]
    tie = _rerank(torch.zeros(1, 3), torch.tensor([[7, 8, 9]]), torch.tensor([[-1, 0, 1]]),
                  torch.tensor([[1.0, 2, 3]]), [2])[0]  # equal scores: the shallower first
    assert tie.tokens == [7, 8] and tie.parents == [-1, 0]
    orphan = _rerank(torch.tensor([[-1.0, -5.0, -0.5]]), torch.tensor([[1, 2, 3]]), torch.tensor([[-1, -1, 1]]),
                     torch.tensor([[1.0, 1, 2]]), [2])[0]  # node 2's parent (1) lost the rerank: it goes too
    assert orphan.tokens == [1] and orphan.parents == [-1]
    inf = _rerank(torch.tensor([[-1.0, float("-inf")]]), torch.tensor([[1, 2]]), torch.tensor([[-1, 0]]),
                  torch.tensor([[1.0, 2]]), [2])[0]  # a node past the sequence's depth never enters
    assert inf.tokens == [1]


def test_verify_rows_see_the_prefix_their_ancestors_and_themselves():
    parents = [-1, -1, 0, 2]  # root -> a, root -> b, a -> c, c -> d
    assert draft_depths(parents) == [1, 1, 2, 3]
    start, end = 100, 105  # the last token at KV index 100, drafts at 101..104
    rows = tree_mask_rows(parents, start, end)
    base = end - TREE_WINDOW
    seen = [{j for j in range(base, end) if (r >> (j - base)) & 1} for r in rows]
    prefix = set(range(base, start))
    assert seen == [prefix | {100}, prefix | {100, 101}, prefix | {100, 102}, prefix | {100, 101, 103},
                    prefix | {100, 101, 103, 104}]


def test_trees_branch_and_later_branches_are_moved_into_place(smol_llm):
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=TREE)
    runner = llm.engine.runner
    paths, trees = [], []
    orig = runner._compact_accepted_kv

    def spy(sched, got):
        paths.extend(got)
        trees.extend(s.draft_parents for s in sched.scheduled if s.samples and s.draft_token_ids)
        return orig(sched, got)
    runner._compact_accepted_kv = spy
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in
               ("Write a short story about a robot.", "Explain photosynthesis simply.",
                "List five fruits and their colors.", "def add(a, b):\n    return a + b\n# now multiply:")]
    base = [o.outputs[0].token_ids for o in smol_llm.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == base
    assert any(p is not None and any(x != i - 1 for i, x in enumerate(p)) for p in trees)  # real branching
    assert any(path != list(range(len(path))) for path in paths)  # a later branch was accepted and moved
    # the moved K/V is what the prefix cache serves: continue every conversation from its pages
    full = [p + llm.engine.tokenizer.decode(ids) for p, ids in zip(prompts, got)]
    hits = llm.engine.stats()["prefix_cache_hits"]
    again = [o.outputs[0].token_ids for o in llm.generate(full, GREEDY, use_tqdm=False)]
    assert llm.engine.stats()["prefix_cache_hits"] > hits
    plain = LLM(None, dtype="float32", max_model_len=2048, progress=False, enable_prefix_caching=False)
    assert again == [o.outputs[0].token_ids for o in plain.generate(full, GREEDY, use_tqdm=False)]
    check_clean(llm)


def test_sequences_of_different_depths_draft_together(smol_llm):
    """Near max_tokens a sequence's tree is shallower (its cache has no room for deeper head
    steps); batched with a deep one, both still give their greedy output."""
    deep = {"method": "eagle", "num_speculative_tokens": 5, "eagle_topk": 6, "num_draft_tokens": 4}
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=deep)
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in
               ("Count from one to ten in words.", "Name three planets.", "Say hello.")]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (40, 2, 3)]  # depths 5, 1, 2 at first
    want = [o.outputs[0].token_ids for o in smol_llm.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    check_clean(llm)
