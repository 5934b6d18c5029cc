"""The fused EAGLE step (``spec_decode/eagle_fused.py``) on the CPU, where it runs the same
program eagerly: greedy output identical to speculation off and to the host path, at batch 1
and 4, with trees and chains, and the cache clean afterwards; the two-stage top-k."""
from __future__ import annotations

import pytest
import torch

from miniinfer.spec_decode.eagle import topk_rows

PROMPTS = [
    "Write a Python function that returns the sum of a list.",
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    "List the numbers from 1 to 15, separated by commas.",
    "Explain what a hash map is in two sentences.",
]


def test_two_stage_topk_equals_topk():
    g = torch.Generator().manual_seed(0)
    for V, k in ((8200, 4), (8192, 1), (49152, 8), (600, 3)):
        x = torch.randn(6, V, generator=g)
        x[0, : V // 2] = float("-inf")  # a masked row
        values, indices = topk_rows(x, k, two_stage=True)
        ref = x.topk(k, dim=-1)
        assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


@pytest.mark.parametrize("spec", [
    {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10},
    {"method": "eagle", "num_speculative_tokens": 3},
], ids=["tree", "chain"])
def test_fused_step_is_lossless_on_cpu(spec):
    from miniinfer import LLM, SamplingParams
    kw = dict(dtype="float32", device="cpu", max_model_len=1024, progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=40)
    llm = LLM(None, speculative_config=spec, **kw)
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    fused = llm.engine.proposer.fused
    fused.enabled = False
    host = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    fused.enabled = True
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]  # batch 4
    alone = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]  # batch 1
    assert fused.gen > 0 and fused.num_run_ahead > 0  # the fused step served most steps, most of them run ahead
    assert got == host and alone == host
    stats = llm.engine.stats()
    llm.engine.check_integrity()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    del llm
    plain = LLM(None, **kw)
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)] == host


def test_fused_step_under_preemption_and_a_small_token_budget():
    """A cache too small for the batch: steps whose schedule preempts (or cuts the drafts to the
    token budget) are not the staged step, so their rows turn into plain decodes; the output
    stays the plain engine's and the cache ends clean."""
    from miniinfer import LLM, SamplingParams
    kw = dict(dtype="float32", device="cpu", max_model_len=1024, progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=32)
    plain = LLM(None, **kw)
    prompts = [plain.engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS * 2]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]
    del plain
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    llm = LLM(None, speculative_config=spec, num_kv_blocks=12, max_num_batched_tokens=64, max_num_seqs=8, **kw)
    llm.engine.proposer.fused.enabled = True
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and llm.engine.proposer.fused.gen > 0
    assert got == want
    llm.engine.check_integrity()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


@pytest.mark.parametrize("overlap,ahead", [(True, True), (False, True), (True, False)],
                         ids=["overlap", "serial", "overlap-no-run-ahead"])
def test_fused_step_with_grammars_is_lossless_on_cpu(overlap, ahead, monkeypatch):
    """Constrained sequences in the fused step (issue #14: the tree's rows filled on the host
    between the draft and the accept): a JSON schema, a regex, a choice and an unconstrained
    request in one batch, and each alone, give the output without speculation; the outputs
    are valid; every fused fill walked the trees it was given. With overlap scheduling
    (``ahead``) the steps run ahead: each fill reads matchers advanced by the step before."""
    import json
    import re

    import jsonschema

    from miniinfer import LLM, SamplingParams, StructuredOutputsParams
    from miniinfer.structured_output.manager import StructuredOutputManager
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    regex = r"([A-Z][a-z]+ is [0-9]{1,3} km away\. ){2,3}"
    cases = [("Describe a person as JSON with name and age.", StructuredOutputsParams(json=schema)),
             ("Repeat: Paris is 120 km away. Paris is 120 km away.", StructuredOutputsParams(regex=regex)),
             ("Which is the capital of Italy?", StructuredOutputsParams(choice=["Paris", "London", "Rome"])),
             (PROMPTS[1], None)]
    kw = dict(dtype="float32", device="cpu", max_model_len=1024, progress=False)

    def params(so):
        return SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)

    plain = LLM(None, **kw)
    prompts = [plain.engine.apply_chat_template([{"role": "user", "content": q}]) for q, _ in cases]
    want = [o.outputs[0] for o in plain.generate(prompts, [params(so) for _, so in cases], use_tqdm=False)]
    del plain
    walked = []
    orig = StructuredOutputManager.fill_verify_rows
    monkeypatch.setattr(StructuredOutputManager, "fill_verify_rows",
                        staticmethod(lambda m, tok, par, block: walked.append(len(tok)) or orig(m, tok, par, block)))
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    llm = LLM(None, speculative_config=spec, overlap_scheduling=ahead, **kw)
    llm.engine.structured_output.overlap = overlap
    drafter = llm.engine.proposer
    drafter.grammar_all_depths = False
    drafter.fused.enabled = True
    split, nodes = [], []  # the batch of each split step; the drafted trees' sizes its fill saw
    finish_split = drafter.fused.step.finish_split

    def spy(started, fill):
        split.append(started[0])
        return finish_split(started, lambda tree: nodes.extend(tree[:, -1].tolist()) or fill(tree))
    monkeypatch.setattr(drafter.fused.step, "finish_split", spy)
    got = [o.outputs[0] for o in llm.generate(prompts, [params(so) for _, so in cases], use_tqdm=False)]
    alone = [llm.generate([p], params(so), use_tqdm=False)[0].outputs[0] for p, (_, so) in zip(prompts, cases)]
    assert split and max(split) == 4 and max(nodes) > 1 and max(walked) > 1  # batch 4 ran split, trees walked
    assert (drafter.fused.num_run_ahead > 0) == ahead
    for outs in (got, alone):
        assert [o.token_ids for o in outs] == [w.token_ids for w in want]
        assert [o.finish_reason for o in outs] == [w.finish_reason for w in want]
    jsonschema.validate(json.loads(got[0].text), schema)
    assert re.fullmatch(regex, got[1].text) or got[1].finish_reason == "length"
    assert got[2].text in ("Paris", "London", "Rome")
    stats = llm.engine.stats()
    assert stats["spec_num_accepted_tokens"] > 0
    llm.engine.check_integrity()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_fused_constrained_steps_under_preemption_and_a_completing_grammar(monkeypatch):
    """Constrained sequences in the fused step with a cache too small for the batch (preemption,
    drafts cut to the token budget) and a choice that completes while drafts go on: each
    output is the plain engine's, the completed request stops with the choice alone, no tree
    is ever walked from a terminated matcher, and the cache ends clean."""
    from miniinfer import LLM, SamplingParams, StructuredOutputsParams
    from miniinfer.structured_output.manager import StructuredOutputManager
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "km": {"type": "integer"}},
              "required": ["city", "km"], "additionalProperties": False}
    cases = [("Say Rome Rome Rome Rome Rome Rome Rome Rome", StructuredOutputsParams(choice=["Rome", "Rome Rome"])),
             ("Describe a trip as JSON with city and km.", StructuredOutputsParams(json=schema)),
             (PROMPTS[2], StructuredOutputsParams(regex=r"[0-9]+(, [0-9]+){3,14}")), (PROMPTS[0], None)] * 2
    kw = dict(dtype="float32", device="cpu", max_model_len=1024, progress=False)
    params = [SamplingParams(temperature=0, max_tokens=32, structured_outputs=so) for _, so in cases]
    plain = LLM(None, **kw)
    prompts = [plain.engine.apply_chat_template([{"role": "user", "content": q}]) for q, _ in cases]
    want = [o.outputs[0] for o in plain.generate(prompts, params, use_tqdm=False)]
    del plain
    terminated = []
    orig = StructuredOutputManager.fill_verify_rows
    monkeypatch.setattr(StructuredOutputManager, "fill_verify_rows", staticmethod(
        lambda m, tok, par, block: terminated.append(m.is_terminated()) or orig(m, tok, par, block)))
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    llm = LLM(None, speculative_config=spec, num_kv_blocks=14, max_num_batched_tokens=64, max_num_seqs=8, **kw)
    drafter = llm.engine.proposer
    drafter.grammar_all_depths = False
    drafter.fused.enabled = True
    split = []
    finish_split = drafter.fused.step.finish_split
    monkeypatch.setattr(drafter.fused.step, "finish_split", lambda *a: split.append(a[0][0]) or finish_split(*a))
    got = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and split and terminated  # constrained fused steps ran
    assert not any(terminated)
    assert [o.token_ids for o in got] == [w.token_ids for w in want]
    assert [o.finish_reason for o in got] == [w.finish_reason for w in want]
    assert got[0].finish_reason == "stop" and got[0].text in ("Rome", "Rome Rome")
    llm.engine.check_integrity()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_fused_step_run_ahead_stops_mid_path_and_aborts():
    """Overlap scheduling with the fused step: step N + 1 is queued before step N is processed
    (``FusedEagleDriver.run_ahead``). Requests that end inside an accepted path (a stop string,
    EOS; ``max_tokens``, which run-ahead leaves to the synchronous steps R + 1 tokens before it),
    n = 2, and one aborted while a step runs ahead give exactly what they give with overlap off
    and without speculation; rows that finished are dropped from the step queued over them,
    and the cache ends clean."""
    from miniinfer import LLM, SamplingParams
    kw = dict(dtype="float32", device="cpu", max_model_len=1024, progress=False)
    params = [SamplingParams(temperature=0, max_tokens=7), SamplingParams(temperature=0, max_tokens=40, stop=[","]),
              SamplingParams(temperature=0, max_tokens=13, n=2), SamplingParams(temperature=0, max_tokens=40)]
    plain = LLM(None, **kw)
    prompts = [plain.engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    want = [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs]
            for o in plain.generate(prompts, params, use_tqdm=False)]
    want_b = plain.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].token_ids
    del plain
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    for ahead in (True, False):
        llm = LLM(None, speculative_config=spec, overlap_scheduling=ahead, **kw)
        fused = llm.engine.proposer.fused
        fused.enabled = True
        got = [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs]
               for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        assert (fused.num_run_ahead > 0) == ahead
        # an abort while a step runs ahead: the other request goes on as alone
        eng = llm.engine
        eng.add_request("a", prompts[3], SamplingParams(temperature=0, max_tokens=40))
        eng.add_request("b", prompts[2], SamplingParams(temperature=0, max_tokens=40))
        before, finished, steps, ahead_at_abort = fused.num_run_ahead, {}, 0, None
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    finished[out.request_id] = out
            steps += 1
            if steps == 6:
                ahead_at_abort = fused.num_run_ahead - before  # (a run-ahead step is in flight now)
                eng.abort_request("a")
        eng.on_idle()
        assert "a" not in finished and (ahead_at_abort > 0) == ahead
        assert finished["b"].outputs[0].token_ids == want_b
        stats = eng.stats()
        eng.check_integrity()
        assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
        del llm, eng
