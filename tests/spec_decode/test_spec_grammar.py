"""Speculative decoding x structured output (issue #14) on the embedded SmolLM2 (fp32): with
a JSON schema, a regex and a choice, greedy output with n-gram / EAGLE (chain and EAGLE-2 tree)
speculation is the output without it, and valid; one mask row per draft position / tree node; a batch mixing constrained +
speculative, speculative-only and plain requests gives each what it gives alone; a draft the
grammar forbids is never committed; a grammar that completes mid-draft ends the request."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from helpers import check_clean
from miniinfer import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
CASES = [
    ("Describe a person as JSON with name, age and tags.", StructuredOutputsParams(json=SCHEMA),
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ("Repeat: Paris is 120 km away. Paris is 120 km away.",
     StructuredOutputsParams(regex=r"([A-Z][a-z]+ is [0-9]{1,3} km away\. ){2,3}"),
     lambda t: re.fullmatch(r"([A-Z][a-z]+ is [0-9]{1,3} km away\. ){2,3}", t) is not None),
    ("Which is the capital of Italy?", StructuredOutputsParams(choice=["Paris", "London", "Rome"]),
     lambda t: t in ("Paris", "London", "Rome")),
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
EAGLE = {"method": "eagle", "num_speculative_tokens": 3}
EAGLE_TREE = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}


def _params(so, max_tokens=48):
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=so)


def _run(llm, cases):
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q, _, _ in cases]
    outs = llm.generate(prompts, [_params(so) if so is not None else SamplingParams(temperature=0, max_tokens=48)
                                  for _, so, _ in cases], use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


@pytest.fixture(scope="module")
def reference(smol_llm):
    return _run(smol_llm, CASES)


@pytest.mark.parametrize("spec", [NGRAM, EAGLE, EAGLE_TREE], ids=["ngram", "eagle", "eagle_tree"])
def test_constrained_greedy_identical_with_speculation(spec, reference):
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=spec)
    got = _run(llm, CASES)
    assert [g[0] for g in got] == [r[0] for r in reference]
    for (_, text, reason), (_, _, check) in zip(got, CASES):
        if reason == "stop":
            check(text)
    stats = llm.engine.stats()
    assert stats["spec_num_draft_tokens"] > 0  # constrained requests did speculate
    check_clean(llm)


def test_mixed_batch_and_mask_rows(smol_llm, reference, monkeypatch):
    """Constrained + speculative, speculative-only and plain (n-gram drafts for all that find
    any) in one batch: each gets its output alone; every verify mask has one row per position
    of each constrained sequence (its last token and each draft) and none for the others."""
    from miniinfer.structured_output.manager import StructuredOutputManager
    calls = []
    orig = StructuredOutputManager.fill_verify_bitmask

    def spy(self, seqs, drafts, parents, seq_rows):
        out = orig(self, seqs, drafts, parents, seq_rows)
        want = [r for s, rr in zip(seqs, seq_rows) if s.grammar_active and not s.is_finished for r in rr]
        calls.append((out.rows if out is not None else [], want, sum(len(d) for d in drafts)))
        return out
    monkeypatch.setattr(StructuredOutputManager, "fill_verify_bitmask", spy)
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=NGRAM)
    plain = [("Repeat: the cat sat on the mat, the cat sat on the mat.", None, None),
             ("List the numbers from 1 to 12.", None, None)]
    alone = _run(smol_llm, plain)
    got = _run(llm, CASES + plain)
    assert [g[0] for g in got] == [r[0] for r in reference] + [a[0] for a in alone]
    assert any(n > 0 for _, _, n in calls)  # some verify steps carried drafts
    assert all(rows == want for rows, want, _ in calls)
    check_clean(llm)


def test_tree_mask_rows_follow_each_branch(smol_llm):
    """Per-node masks over a tree (xgrammar's traversal in first-child / next-sibling form):
    each node's row is what the grammar allows after the path to it, siblings apart; a node the
    grammar forbids gets an all-allowed (unused) row; the matcher itself does not move."""
    from types import SimpleNamespace

    from miniinfer.structured_output.manager import _child_sibling_lists
    assert _child_sibling_lists([-1, -1, 0, 0, 2]) == ([1, 3, -1, 5, -1, -1], [-1, 2, -1, 4, -1, -1])
    so = smol_llm.engine.structured_output
    tok = smol_llm.engine.tokenizer
    matcher = so.new_matcher(so.compile(StructuredOutputsParams(choice=["Paris France", "Rome Italy"])))
    seq = SimpleNamespace(grammar=matcher, grammar_active=True, is_finished=False)
    paris, france, rome, italy, london = (tok.encode(w, add_special_tokens=False)[0]
                                          for w in ("Paris", " France", "Rome", " Italy", "London"))
    # root -> Paris -> France, root -> Rome -> Italy, root -> London (forbidden) -> France
    drafts, parents = [paris, rome, london, france, italy, france], [-1, -1, -1, 0, 1, 2]
    mask = so.fill_verify_bitmask([seq], [drafts], [parents], [range(0, 7)])

    def allowed(row: int, t: int) -> bool:
        return bool((int(mask.bitmask[row, t // 32]) >> (t % 32)) & 1)
    assert allowed(0, paris) and allowed(0, rome) and not allowed(0, london)  # the root's row
    assert allowed(1, france) and not allowed(1, italy)  # after "Paris"
    assert allowed(2, italy) and not allowed(2, france)  # after "Rome": its sibling's path apart
    assert bool((mask.bitmask[3] == -1).all()) and bool((mask.bitmask[6] == -1).all())  # under "London": unused
    assert not allowed(4, france) and not allowed(5, italy)  # complete strings: only the end may follow
    assert not matcher.is_terminated() and matcher.accept_token(rome)  # the walk left the matcher as it was


def test_tree_masks_of_many_sequences_on_fill_threads_equal_one_by_one(smol_llm, monkeypatch):
    """Several constrained sequences' trees walked as tasks on the fill pool (each through its
    own matcher, in parallel) give the rows that walking them one by one gives, at each
    sequence's own rows; an unconstrained sequence's rows stay all-allowed."""
    from types import SimpleNamespace

    from miniinfer.structured_output.fill_pool import FillPool as _FillPool
    so = smol_llm.engine.structured_output
    tok = smol_llm.engine.tokenizer
    grammar = so.compile(StructuredOutputsParams(choice=["Paris France", "Rome Italy", "Oslo Norway"]))
    words = {w: tok.encode(w, add_special_tokens=False)[0] for w in ("Paris", " France", "Rome", " Italy", "Oslo")}
    trees = [([words["Paris"], words[" France"]], [-1, 0]),
             ([words["Rome"], words["Paris"], words[" Italy"]], [-1, -1, 0]),
             ([words["Oslo"]], [-1]), ([words["Rome"], words[" Italy"]], [-1, 0])]
    seqs = [SimpleNamespace(grammar=so.new_matcher(grammar), grammar_active=i != 2, is_finished=False)
            for i in range(len(trees))]
    seq_rows, start = [], 0
    for drafts, _ in trees:
        seq_rows.append(range(start, start + len(drafts) + 1))
        start += len(drafts) + 1
    args = ([d for d, _ in trees], [p for _, p in trees], seq_rows)
    monkeypatch.setattr(so, "_fill_pool", None)
    one_by_one = so.fill_verify_bitmask(seqs, *args).bitmask.clone()
    monkeypatch.setattr(so, "_fill_pool", _FillPool(3))
    monkeypatch.setattr(so, "parallel_tasks", True)
    on_pool = so.fill_verify_bitmask(seqs, *args).bitmask
    assert torch.equal(on_pool, one_by_one)
    assert bool((one_by_one[seq_rows[2].start:seq_rows[2].stop] == -1).all())  # unconstrained
    assert not bool((one_by_one[seq_rows[0].start] == -1).all())  # a constrained root row constrains


def test_draft_masks_of_many_sequences_on_fill_threads_equal_one_by_one(smol_llm, monkeypatch):
    """Grammar-aware drafting's per-sequence tree walks as tasks on the fill pool give the
    masks that walking them one by one gives."""
    from types import SimpleNamespace

    from miniinfer.spec_decode.grammar_draft import GrammarDraftMask
    from miniinfer.structured_output.fill_pool import FillPool as _FillPool
    so = smol_llm.engine.structured_output
    tok = smol_llm.engine.tokenizer
    grammar = so.compile(StructuredOutputsParams(choice=["Paris France", "Rome Italy"]))
    paris, rome = (tok.encode(w, add_special_tokens=False)[0] for w in ("Paris", "Rome"))
    seqs = [SimpleNamespace(grammar=so.new_matcher(grammar), grammar_active=True, is_finished=False)
            for _ in range(3)]
    paths = [[[], [paris]], [[], [rome]], [[rome], [rome, paris]]]
    masks = GrammarDraftMask(so, None, smol_llm.engine.model_config.vocab_size)
    monkeypatch.setattr(so, "_fill_pool", None)
    one_by_one = masks.rows(seqs, paths)
    monkeypatch.setattr(so, "_fill_pool", _FillPool(3))
    monkeypatch.setattr(so, "parallel_tasks", True)
    on_pool = masks.rows(seqs, paths)
    assert torch.equal(on_pool, one_by_one)
    allowed = masks.expand(one_by_one.view(6, -1), torch.device("cpu")).view(3, 2, -1)  # [B, J, V] bool
    assert bool(allowed[0, 0, paris]) and not bool(allowed[2, 1].any())  # "Rome" then "Paris": forbidden


def _record_draft_grammaticality(monkeypatch, root_children_only: bool = False) -> list[bool]:
    """Spy on the verify masks: per draft of a constrained sequence (or of the root's children
    only), whether its parent's row allows it. Returns the list the spy appends to."""
    from miniinfer.structured_output.manager import StructuredOutputManager
    seen: list[bool] = []
    orig = StructuredOutputManager.fill_verify_bitmask

    def spy(self, seqs, drafts, parents, seq_rows):
        out = orig(self, seqs, drafts, parents, seq_rows)
        for s, d, par, rows in zip(seqs, drafts, parents, seq_rows):
            if s.grammar_active and not s.is_finished and out is not None:
                for t, p in zip(d, par):
                    if root_children_only and p >= 0:
                        continue
                    word = int(out.bitmask[rows.start + p + 1, t // 32])
                    seen.append(bool((word >> (t % 32)) & 1))
        return out
    monkeypatch.setattr(StructuredOutputManager, "fill_verify_bitmask", spy)
    return seen


def test_grammar_aware_drafts_are_all_grammatical(reference, monkeypatch):
    """With the head's proposals masked by the grammar (the default), every draft of a
    constrained sequence is allowed at its parent's row of the verify mask; without, some are
    not; the output is the same either way."""
    seen = _record_draft_grammaticality(monkeypatch)
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=EAGLE_TREE)
    counts = {}
    for aware in (True, False):
        llm.engine.proposer.grammar_aware = aware
        seen.clear()
        got = _run(llm, CASES)
        assert [g[0] for g in got] == [r[0] for r in reference]
        counts[aware] = (sum(seen), len(seen))
    assert counts[True][0] == counts[True][1] > 0  # every draft grammatical
    assert counts[False][0] < counts[False][1]  # unmasked heads propose forbidden tokens
    check_clean(llm)


def test_preemption_of_constrained_speculative_requests(reference):
    """A tiny cache and token budget: constrained requests drafting trees are preempted and
    chunked, and each still gives its output without speculation; the cache ends clean."""
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=EAGLE_TREE,
              num_kv_blocks=7, max_num_batched_tokens=48, max_num_seqs=3)
    got = _run(llm, CASES)
    assert [g[0] for g in got] == [r[0] for r in reference]
    assert llm.engine.stats()["num_preemptions"] > 0
    check_clean(llm)


def test_grammar_completing_mid_draft_ends_the_request(smol_llm, monkeypatch):
    """A choice completes while the drafts go on ("Rome Rome Rome ..." invites n-gram drafts
    past it): the request stops there with the choice alone, and no verify mask is ever filled
    from a terminated matcher."""
    from miniinfer.structured_output.manager import StructuredOutputManager
    orig = StructuredOutputManager.fill_verify_bitmask
    filled_terminated = []

    def spy(self, seqs, drafts, parents, seq_rows):
        filled_terminated.extend(s.grammar.is_terminated() for s in seqs if s.grammar is not None)
        return orig(self, seqs, drafts, parents, seq_rows)
    monkeypatch.setattr(StructuredOutputManager, "fill_verify_bitmask", spy)
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=NGRAM)
    case = [("Say Rome Rome Rome Rome Rome Rome Rome Rome", StructuredOutputsParams(choice=["Rome", "Rome Rome"]),
             lambda t: t in ("Rome", "Rome Rome"))]
    (ids, text, reason), = _run(llm, case)
    (want_ids, _, want_reason), = _run(smol_llm, case)
    assert (ids, reason) == (want_ids, want_reason) and reason == "stop" and text in ("Rome", "Rome Rome")
    assert llm.engine.stats()["spec_num_draft_tokens"] > 0 and not any(filled_terminated)
    check_clean(llm)


def test_root_only_grammar_drafting_in_the_static_program(reference, monkeypatch):
    """``grammar_all_depths`` off (the CUDA default): the static tree program masks the root's
    children with the grammar, deeper nodes are unmasked; the root's children are then all
    grammatical, and the output is the same."""
    seen = _record_draft_grammaticality(monkeypatch, root_children_only=True)
    llm = LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=EAGLE_TREE)
    drafter = llm.engine.proposer
    drafter.grammar_all_depths = False
    used = []
    grow = drafter.static.grow
    monkeypatch.setattr(drafter.static, "grow", lambda *a, **kw: used.append(a[3] is not None) or grow(*a, **kw))
    got = _run(llm, CASES)
    assert [g[0] for g in got] == [r[0] for r in reference]
    assert any(used)  # the static program ran with root masks
    assert seen and all(seen)
    check_clean(llm)
