"""FP8 (e4m3) KV cache on the GPU: the same model with kv_cache_dtype="fp8" vs the bf16 cache.

Qwen2-0.5B with dummy weights: logits of a 300-token prompt (through the paged path, prefill
in chunks so that the extend kernel reads fp8 prefix pages) within a relative error bound, top-1
mostly agreeing, and greedy generation (CUDA-graph decode, prefix cache) mostly agreeing.
The embedded SmolLM2 (when installed): greedy chat answers mostly agree. The bounds are
first guesses (fp8 keeps 3 mantissa bits: ~3% per value); benchmarks/fp8_kv_bench.py
reports the measured numbers.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# both engines of a pair live at once: a fixed block count (no memory profiling, which would
# count the first engine's cache against the second's budget)
KW = dict(load_format="dummy", dtype="bfloat16", max_model_len=2048, num_kv_blocks=1024,
          max_num_batched_tokens=128, progress=False)


def _pair(model, **kw):
    from miniinfer import LLM
    bf16 = LLM(model, **kw)
    fp8 = LLM(model, kv_cache_dtype="fp8", **kw)
    return bf16, fp8


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions equal up to each pair's first divergence, averaged (a divergence
    ends the comparison: later tokens follow different contexts)."""
    fracs = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / len(fracs)


@pytest.fixture(scope="module")
def qwen2_pair():
    bf16, fp8 = _pair("qwen2-0.5b", **KW)
    assert fp8.engine.runner.kv_caches.dtype == torch.float8_e4m3fn
    yield bf16, fp8
    del bf16, fp8
    torch.cuda.empty_cache()


def test_fp8_cache_is_fp8_and_holds_twice_the_tokens():
    """Same memory budget (same model and utilization, engines one after the other): about
    twice the blocks, in half the bytes per block."""
    import gc
    from miniinfer import LLM
    # a budget below the cap of max_num_seqs full-length sequences (first GPU run: both hit it)
    kw = {**KW, "gpu_memory_utilization": 0.1, "max_num_seqs": 2048}
    del kw["num_kv_blocks"]
    blocks, nbytes = {}, {}
    for kv in ("auto", "fp8"):
        llm = LLM("qwen2-0.5b", kv_cache_dtype=kv, **kw)
        caches = llm.engine.runner.kv_caches
        assert caches.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
        blocks[kv], nbytes[kv] = llm.engine.runner.num_blocks, caches.nbytes
        del llm, caches
        gc.collect()
        torch.cuda.empty_cache()
    ratio = blocks["fp8"] / blocks["auto"]
    assert 1.8 < ratio < 2.2, blocks
    assert abs(nbytes["fp8"] / nbytes["auto"] - 1) < 0.1, nbytes


def test_fp8_logits_close_to_bf16(qwen2_pair):
    bf16, fp8 = qwen2_pair
    ids = torch.randint(0, 10000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    a = bf16.engine.runner.forward_logits(ids).float()
    b = fp8.engine.runner.forward_logits(ids).float()
    rel = ((b - a).norm() / a.norm()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert rel < 0.15, rel  # H200, 2026-11-30: 0.081
    assert top1 > 0.6, top1  # measured 0.79 (random weights: no outlier structure for one scale); broken: ~0


def test_fp8_greedy_mostly_agrees(qwen2_pair):
    from miniinfer import SamplingParams
    bf16, fp8 = qwen2_pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 10000, (int(n),), generator=g).tolist() for n in (5, 40, 130, 300, 17, 64, 200, 9)]
    p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in bf16.generate(prompts, p, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in fp8.generate(prompts, p, use_tqdm=False)]
    assert _agreement(a, b) > 0.1, (a, b)  # measured 0.31: random-weight greedy paths diverge after one flip
    # the prefix cache serves the fp8 pages again: a repeat is identical
    again = [o.outputs[0].token_ids for o in fp8.generate(prompts, p, use_tqdm=False)]
    assert again == b
    fp8.engine.check_integrity()


def test_fp8_smollm2_greedy_mostly_agrees():
    from miniinfer import LLM, SamplingParams
    from miniinfer.loader.embedded import embedded_model_path
    try:
        embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    kw = dict(dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.2, progress=False)
    questions = ["What is the capital of France?", "List the numbers from 1 to 20, separated by commas.",
                 "Write a short poem about the sea.", "Explain what a hash map is in two sentences."]
    greedy = SamplingParams(temperature=0, max_tokens=64)
    outs = []
    for kv in ("auto", "fp8"):
        llm = LLM(None, kv_cache_dtype=kv, **kw)
        prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
        del llm
        torch.cuda.empty_cache()
    assert _agreement(*outs) > 0.5, outs
