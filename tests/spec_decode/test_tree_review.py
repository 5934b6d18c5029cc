"""Review of EAGLE-2 draft trees (adversarial checks).

What holds: the tree rejection sampler follows the target distribution under temperature,
top-k, top-p and min-p (chi-square over the joint law of the first two tokens of a branching
tree), and a seeded sequence's verify is reproducible; greedy tree output equals plain decoding
under a tiny token budget (trees cut by the scheduler, chunked prefill) and under preemption, with
stop strings / stop tokens / max_tokens landing mid-tree, and the engine is left clean.

Bugs this review found, fixed, kept as regression tests:
* the logprobs of tokens committed through a later branch of a tree were read from the wrong
  logits rows (the chain layout ``row + j`` instead of the path's ``row + spec_paths[b][j]``);
* a seeded request's output depended on the drafts (and so on the prefix cache's state): the
  rejection sampler drew R x V noise per step from the request's generator; now each row draws
  from the seed of the position it samples for;
* a prefill chunk that samples in the same step as a verify had ``num_computed_tokens`` rolled
  back to ``start + 1`` and re-prefilled its prompt every step (any method).
"""
from __future__ import annotations

import pytest
import torch

from helpers import check_clean
from miniinfer import LLM, SamplingParams
from miniinfer.engine.sequence import Sequence
from miniinfer.sample import SamplingMetadata
from miniinfer.sample.sampler import scaled_logits
from miniinfer.spec_decode.rejection_sampler import rejection_sample

V = 6
TREE = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 3, "num_draft_tokens": 8}


def _tree_sample(logits_rows, drafts, parents, params, copies, seed=0, row_seeds=None):
    k = len(drafts)
    seqs = [Sequence(f"r{i}", 0, [0], 1, params) for i in range(copies)]
    md = SamplingMetadata.build([s for s in seqs for _ in range(k + 1)], V, torch.device("cpu"))
    node_tokens = torch.tensor(([-1] + drafts) * copies)
    base = torch.arange(copies)[:, None] * (k + 1)
    parent_rows = base + torch.tensor([0] + [p + 1 for p in parents])
    parent_rows[:, 0] = -1
    index = torch.arange(copies * (k + 1)).view(copies, k + 1)
    rows = [range(i * (k + 1), (i + 1) * (k + 1)) for i in range(copies)]
    g = torch.Generator().manual_seed(seed)
    return rejection_sample(logits_rows.repeat(copies, 1), md, node_tokens, parent_rows.view(-1), index, rows,
                            row_seeds, g)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.3, top_p=0.8),
                                    SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=1.0)],
                         ids=["top_k", "top_p", "min_p", "plain"])
def test_tree_sampler_joint_law_of_two_tokens(params):
    """root -> {1, 3}; 1 -> {0, 2}; 3 -> {4}: (t1, t2) ~ q0(t1) q_{row(t1)}(t2) when t1 is a
    child, else t1 ~ q0 alone (q: the filtered, tempered target of each row)."""
    torch.manual_seed(5)
    drafts, parents = [1, 3, 0, 2, 4], [-1, -1, 0, 0, 1]
    logits = torch.randn(6, V) * 1.5
    n = 60_000
    out = _tree_sample(logits, drafts, parents, params, n, seed=3)
    one = Sequence("x", 0, [0], 1, params)
    q = scaled_logits(logits.clone(), SamplingMetadata.build([one] * 6, V, torch.device("cpu"))).softmax(-1).double()
    row_of = {1: 1, 3: 2}
    expected = {}
    for t1 in range(V):
        if t1 in row_of:
            for t2 in range(V):
                expected[(t1, t2)] = float(q[0, t1] * q[row_of[t1], t2])
        else:
            expected[(t1, None)] = float(q[0, t1])
    counts: dict = {}
    for r in out.token_ids[:, :2].tolist():
        key = (r[0], r[1] if r[0] in row_of else None)
        counts[key] = counts.get(key, 0) + 1
    assert all(expected.get(k, 0) > 0 for k in counts), counts  # nothing the target excludes
    chi = sum((counts.get(k, 0) - n * e) ** 2 / (n * e) for k, e in expected.items() if e > 0)
    df = sum(1 for e in expected.values() if e > 0) - 1
    crit = {0: 0.0, 1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}.get(df, 1.5 * df + 20)  # p ~ 0.001
    assert chi <= crit + 1e-9, (chi, df, counts)


def test_tree_sampler_seeded_rows_are_reproducible():
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    drafts, parents = [1, 3, 0, 2, 4], [-1, -1, 0, 0, 1]
    p = SamplingParams(temperature=1.0)
    from miniinfer.worker.input_batch import draft_depths
    seeds = [900 + d for d in [0] + draft_depths(parents)] + [None] * (3 * (len(drafts) + 1))  # copy 0: seeded by position
    a = _tree_sample(logits, drafts, parents, p, 4, seed=0, row_seeds=seeds)
    b = _tree_sample(logits, drafts, parents, p, 4, seed=1, row_seeds=seeds)
    assert a.token_ids[0].tolist() == b.token_ids[0].tolist() and a.paths[0].tolist() == b.paths[0].tolist()


def _prompts(llm, qs):
    return [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in qs]


def test_greedy_trees_under_tiny_budget_and_preemption(smol_llm):
    """Trees cut by a 24-token step budget (chunked prefill beside verifies) and preempted by a
    14-block cache; stop strings, stop tokens and max_tokens land mid-tree."""
    spec = {"method": "eagle", "num_speculative_tokens": 6, "eagle_topk": 4, "num_draft_tokens": 24}
    qs = ("Write a short story about a robot.", "Explain photosynthesis simply.", "Count from one to ten in words.",
          "Name three planets.", "Why is the sky blue?", "Write a haiku about rain.")
    prompts = _prompts(smol_llm, qs)
    params = [SamplingParams(temperature=0, max_tokens=40, stop=["the"]),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[13]),
              SamplingParams(temperature=0, max_tokens=7), SamplingParams(temperature=0, max_tokens=30),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), SamplingParams(temperature=0, max_tokens=3)]
    want = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for o in smol_llm.generate(prompts, params, use_tqdm=False)]
    for kw in ({"max_num_batched_tokens": 24}, {"num_kv_blocks": 14}):
        llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=spec, **kw)
        got = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
               for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want, kw
        assert llm.engine.stats()["spec_num_accepted_tokens"] > 0
        check_clean(llm)


def test_tree_logprobs_equal_plain_decoding(smol_llm):
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=TREE)
    prompts = _prompts(llm, ("Write a short story about a robot.", "Explain photosynthesis simply."))
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    want = smol_llm.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for t, lw, lg in zip(w.outputs[0].token_ids, w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert set(lg) == set(lw)
            assert lg[t].rank == lw[t].rank and abs(lg[t].logprob - lw[t].logprob) < 1e-3


def test_seeded_tree_request_is_reproducible_across_prefix_cache_hits():
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False,
              speculative_config={"method": "eagle", "num_speculative_tokens": 5, "eagle_topk": 4,
                                  "num_draft_tokens": 16})
    prompts = _prompts(llm, ("Write a short story about a robot.", "Explain photosynthesis simply.",
                             "Write a haiku about rain."))
    same = []
    for prompt in prompts:
        sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=40, seed=1234)
        first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids  # the second run hits the cache
        same.append(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == first)
    assert all(same), same


def test_prefill_beside_a_verify_keeps_its_computed_tokens():
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=TREE)
    eng = llm.engine
    pa, pb = _prompts(llm, ("Count from one to twenty: one two three four five six",
                            "Explain in detail how photosynthesis works in plants, step by step."))
    eng.add_request("a", pa, SamplingParams(temperature=0, max_tokens=30))
    eng.step()
    eng.step()  # a decodes with drafts from now on
    eng.add_request("b", pb, SamplingParams(temperature=0, max_tokens=8))
    eng.step()  # b's prefill samples in a's verify step
    b = next(s for s in eng.scheduler.running if s.request_id == "b")
    computed = b.num_computed_tokens, b.num_tokens - 1
    while eng.has_unfinished_requests():
        eng.step()
    check_clean(llm)
    assert computed[0] == computed[1], computed
