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
    assert fused.gen > 0  # the fused step served most steps
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
