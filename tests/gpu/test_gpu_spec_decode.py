"""Speculative decoding on the GPU: the embedded SmolLM2 in fp32, greedy, is token-identical
with n-gram, draft-model, EAGLE (the shipped head, its steps in CUDA graphs) and EAGLE-2 tree speculation on and off, at batch 1 (a verify replays a prefill
CUDA graph with several logits rows) and batch 8 (eager verify), and leaves the cache clean."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [
    "Write a Python function that returns the sum of a list, then show it called on [1, 2, 3].",
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    "List the numbers from 1 to 20, separated by commas.",
    "What is the capital of France?",
    "Write a JSON array of 4 objects with fields id and name.",
    "Write a short poem about the sea.",
    "Translate to French: good morning, good evening, good night.",
    "Explain what a hash map is in two sentences.",
]


def test_greedy_identical_with_speculation_fp32():
    from miniinfer import LLM, SamplingParams
    from miniinfer.loader.embedded import embedded_model_path
    kw = dict(dtype="float32", max_model_len=2048, gpu_memory_utilization=0.2, progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=64)
    base = LLM(None, **kw)
    prompts = [base.engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in base.generate(prompts, greedy, use_tqdm=False)]
    del base
    for spec in ({"method": "ngram", "num_speculative_tokens": 5},
                 {"method": "draft_model", "model": embedded_model_path(), "num_speculative_tokens": 3},
                 {"method": "eagle", "num_speculative_tokens": 3},
                 # EAGLE-2 trees: 11 verify rows replay a prefill graph with the tree mask at batch 1;
                 # 25 rows run the eager Triton tree-mask kernel
                 {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10},
                 {"method": "eagle", "num_speculative_tokens": 5, "eagle_topk": 6, "num_draft_tokens": 24}):
        llm = LLM(None, speculative_config=spec, **kw)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == want, spec
        alone = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        assert alone == want, spec
        s = llm.engine.stats()
        assert s["spec_num_accepted_tokens"] > 0
        if spec["method"] == "eagle":  # the fused step (eagle_fused.py) served the steady state, run ahead
            assert llm.engine.proposer.fused.gen > 0 and llm.engine.proposer.fused.num_run_ahead > 0
        if spec["method"] == "draft_model":
            assert s["spec_num_accepted_tokens"] == s["spec_num_draft_tokens"]  # draft = target
        llm.engine.check_integrity()
        assert s["num_free_kv_blocks"] == s["num_kv_blocks"]
        del llm


def test_static_tree_graphs_replay_the_eager_program():
    """EAGLE-2 trees from the captured static program (one CUDA graph per batch bucket,
    ``spec_decode/eagle_tree_static.py``) equal the same program run eagerly on the same staged
    inputs and the step's depth budgets (``depth_limit``: rows near max_tokens), at batch 1 and 3
    (bucket 4: one padding row), fp32; that the program grows
    ``grow_trees``' trees is a CPU test (tests/spec_decode/test_eagle_tree_static.py)."""
    from miniinfer import LLM, SamplingParams
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    llm = LLM(None, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.2, progress=False,
              speculative_config=spec)
    llm.engine.proposer.fused.enabled = False  # every drafting step through the static program
    static = llm.engine.proposer.static
    assert 1 in static.graphs and 4 in static.graphs
    orig, calls = static.grow, []

    def both(tables, num_tokens, root_h, allowed=None, **budgets):
        got = orig(tables, num_tokens, root_h, allowed, **budgets)
        B = len(num_tokens)
        graph_out = static.graphs[static.bucket(B)][1][:, :B].clone()
        # the step's own depth budgets (not the staged depth_limit: a stale row there would show)
        depths = budgets.get("depths") or [static.D] * B
        limit = torch.tensor(depths, dtype=torch.float32, device=static.device)
        eager = static.program(B, static.num_tokens[:B].clone(), static.block_tables[:B].clone(),
                               static.live[:B].clone(), static.root_h[:B].clone(), static.root_allowed[:B].clone(),
                               limit)
        calls.append((B, torch.equal(graph_out, eager), min(depths) < static.D))
        return got
    static.grow = both
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:3]]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    static.grow = orig
    assert any(b == 3 for b, _, _ in calls) and any(b == 1 for b, _, _ in calls)
    assert any(limited for _, _, limited in calls)  # steps near max_tokens: depth-limited replays
    same = sum(s for _, s, _ in calls)
    assert same == len(calls), f"{len(calls) - same} of {len(calls)} graph replays differ from the eager program"
    llm.engine.check_integrity()


def test_constrained_fused_step_graphs_fp32():
    """Constrained requests in the fused EAGLE step on the GPU (issue #14): the three graphs of
    ``run_split`` (draft, verify, masked accept) with the verify's rows filled between them,
    overlap on and off, give the output without speculation, valid, at batch 4 and alone."""
    pytest.importorskip("xgrammar")
    import json

    from miniinfer import LLM, SamplingParams, StructuredOutputsParams
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    sos = [StructuredOutputsParams(json=schema), StructuredOutputsParams(regex=r"[a-z]+( [a-z]+){3,5}\."),
           StructuredOutputsParams(choice=["Paris", "London", "Rome"]), None]
    kw = dict(dtype="float32", max_model_len=2048, gpu_memory_utilization=0.2, progress=False)
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=so) for so in sos]
    base = LLM(None, **kw)
    prompts = [base.engine.apply_chat_template([{"role": "user", "content": p}]) for p in
               ("Describe a person as JSON.", PROMPTS[1], "What is the capital of Italy?", PROMPTS[0])]
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    del base
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    llm = LLM(None, speculative_config=spec, **kw)
    step = llm.engine.proposer.fused.step
    assert 4 in step.split  # the split graphs were captured
    runs = []
    orig = step.start_split
    step.start_split = lambda B, overlap=True: runs.append((B, overlap)) or orig(B, overlap)
    for overlap in (True, False):
        llm.engine.structured_output.overlap = overlap
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, overlap
        assert [llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)] == want
        if outs[0].outputs[0].finish_reason == "stop":  # (48 tokens may cut the JSON short)
            json.loads(outs[0].outputs[0].text)
        assert outs[2].outputs[0].text in ("Paris", "London", "Rome")
    assert (4, True) in runs and (4, False) in runs
    assert llm.engine.proposer.fused.num_run_ahead > 0  # (overlap scheduling: steps queued ahead)
    s = llm.engine.stats()
    assert s["spec_num_accepted_tokens"] > 0
    llm.engine.check_integrity()
    assert s["num_free_kv_blocks"] == s["num_kv_blocks"]


def test_fused_step_launch_has_no_hidden_sync(monkeypatch):
    """Issue #14: no hidden blocking copy (``.cpu()``, ``.item()``, pageable memory) while the
    fused step is staged and launched, constrained rows included, nor while a step is queued
    ahead (``run_ahead`` and its ``finish``): all run under
    ``torch.cuda.set_sync_debug_mode("error")``; only the explicit wait for the drafted tree
    (an event) may block, and it is let through."""
    pytest.importorskip("xgrammar")
    from miniinfer import LLM, SamplingParams, StructuredOutputsParams
    spec = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}
    llm = LLM(None, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.2, progress=False,
              speculative_config=spec)
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    params = [SamplingParams(temperature=0, max_tokens=32,
                             structured_outputs=StructuredOutputsParams(regex=r"[a-z ,.]{8,200}") if i % 2 else None)
              for i in range(4)]
    llm.generate(prompts, params, use_tqdm=False)  # warm up (first-use copies of constants)
    sync = torch.cuda.Event.synchronize

    def explicit_wait(self):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return sync(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", explicit_wait)
    fused, calls = llm.engine.proposer.fused, []

    def strict(fn, name):
        def run(*a, **kw):
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if out is not False and out is not None:  # (a stage that declined leaves the last staged rows' state)
                calls.append((name, bool(fused.constrained)))
            if name == "run_ahead" and out is not None:
                return strict(out, "finish")
            return out
        return run
    monkeypatch.setattr(fused, "stage", strict(fused.stage, "stage"))
    monkeypatch.setattr(fused, "launch", strict(fused.launch, "launch"))
    monkeypatch.setattr(fused, "run_ahead", strict(fused.run_ahead, "run_ahead"))
    llm.generate(prompts, params, use_tqdm=False)
    assert ("launch", True) in calls and ("stage", True) in calls
    assert ("run_ahead", True) in calls and ("finish", True) in calls
