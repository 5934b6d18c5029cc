"""Tensor parallelism on 2 GPUs: TP=2 gives TP=1's greedy tokens (shard-consistent dummy
weights, fp32), with CUDA graphs and overlap scheduling on, under each all-reduce mode."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

KW = dict(load_format="dummy", dtype="float32", max_model_len=1024, gpu_memory_utilization=0.2, progress=False,
          max_num_seqs=32)


def _prompts():
    import random
    rng = random.Random(5)
    return [[rng.randrange(0, 10000) for _ in range(n)] for n in (5, 40, 130, 300, 17, 64)]


def _greedy(llm):
    from miniinfer import SamplingParams
    outs = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def want():
    from miniinfer import LLM
    llm = LLM("qwen2-0.5b", **KW)
    ids = _greedy(llm)
    del llm
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    return ids


@pytest.mark.parametrize("mode", ["symm_mem", "nccl"])
def test_tp2_equals_tp1_fp32(want, mode):
    from miniinfer import LLM
    llm = LLM("qwen2-0.5b", tensor_parallel_size=2, all_reduce_mode=mode, **KW)
    try:
        assert llm.engine.runner.cuda_graphs is not None and llm.engine.config.overlap_scheduling
        assert _greedy(llm) == want
    finally:
        llm.engine.shutdown()


def test_dead_rank_raises_not_hangs():
    from miniinfer import LLM, SamplingParams
    llm = LLM("qwen2-0.5b", tensor_parallel_size=2, **{**KW, "dtype": "bfloat16"})
    proc = llm.engine.tp_procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="rank"):
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - t < 30
    llm.engine.shutdown()
