"""Tensor parallelism on CPU (gloo): N ranks give exactly the greedy outputs of one rank."""
from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import check_clean, dummy_decoder_folder, random_prompts
from miniinfer import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _run(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("name,tp", [("qwen2", 2), ("llama", 4)])  # llama: 2 KV heads < 4 ranks
def test_tiny_models_tp_equals_one_rank(tiny_llm, name, tp):
    prompts = random_prompts(6, seed=31, min_len=3, max_len=50)
    want = _run(tiny_llm(name, max_num_batched_tokens=64), prompts)
    llm = tiny_llm(name, max_num_batched_tokens=64, tensor_parallel_size=tp)
    try:
        procs = list(llm.engine.tp_procs)
        assert len(procs) == tp - 1 and all(p.is_alive() for p in procs)
        assert _run(llm, prompts) == want
        check_clean(llm)
    finally:
        llm.engine.shutdown()
    assert not any(p.is_alive() for p in procs)  # no orphan ranks


def test_smollm2_tp3_equals_one_rank(smol_llm):
    """The embedded model: 9 heads and 3 KV heads over 3 ranks."""
    from miniinfer import LLM
    qs = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colors."]
    prompts = [smol_llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    want = _run(smol_llm, prompts)
    llm = LLM(None, dtype="float32", max_model_len=2048, tensor_parallel_size=3, progress=False)
    try:
        assert _run(llm, prompts) == want
    finally:
        llm.engine.shutdown()


def test_dead_rank_fails_with_an_error(tiny_llm):
    llm = tiny_llm("qwen2", tensor_parallel_size=2)
    proc = llm.engine.tp_procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    t = time.monotonic()
    with pytest.raises(Exception):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert time.monotonic() - t < 60
    llm.engine.shutdown()


@pytest.mark.parametrize("family,heads,kv_heads,tp", [("qwen2", 6, 6, 2), ("qwen2", 6, 6, 3), ("qwen3", 6, 3, 3)])
def test_dummy_weights_are_shard_consistent(tmp_path, family, heads, kv_heads, tp):
    """Random ("dummy") weights are drawn for the full tensors and then sliced, so TP=N holds the
    same model as TP=1 and greedy outputs are identical (issue #15)."""
    from miniinfer import LLM
    folder = dummy_decoder_folder(tmp_path, family, heads, kv_heads)
    kw = dict(load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64, progress=False)
    prompts = random_prompts(4, seed=8, min_len=3, max_len=30, vocab=600)
    want = _run(LLM(folder, **kw), prompts)
    assert len({tuple(w) for w in want}) > 1  # not a degenerate model
    llm = LLM(folder, tensor_parallel_size=tp, **kw)
    try:
        assert _run(llm, prompts) == want
    finally:
        llm.engine.shutdown()
