"""The engine's own API (what the server drives): add_request / step / abort, streaming
outputs, length limits."""
from __future__ import annotations

import pytest

from helpers import check_clean, random_prompts
from miniinfer import SamplingParams


def test_step_streams_cumulative_outputs(llama_llm):
    eng = llama_llm.engine
    p = random_prompts(1, seed=51, min_len=20, max_len=20)[0]
    eng.add_request("s1", p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    seen = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id == "s1"
            seen.append((list(out.outputs[0].token_ids), out.finished))
    assert [len(t) for t, _ in seen] == [1, 2, 3, 4, 5]
    assert all(a == b[:len(a)] for (a, _), (b, _) in zip(seen, seen[1:]))  # cumulative
    assert [f for _, f in seen] == [False] * 4 + [True]
    check_clean(llama_llm)


def test_abort_and_duplicate_ids(llama_llm):
    eng = llama_llm.engine
    prompts = random_prompts(3, seed=52, min_len=10, max_len=30)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("a1", prompts[0])
    eng.step()
    eng.step()
    eng.abort_request("a1")
    eng.abort_request("nope")  # unknown ids are ignored
    eng.check_integrity()
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != "a1"
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"a0", "a2"} and all(len(o.outputs[0].token_ids) == 50 for o in done.values())
    for rid in list(eng.requests):
        eng.abort_request(rid)
    check_clean(llama_llm)


def test_length_limits(tiny_llm):
    llm = tiny_llm("llama", max_model_len=40)
    p = random_prompts(1, seed=53, min_len=30, max_len=30)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"
    out = llm.generate([list(range(4, 43))], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    check_clean(llm)


def test_max_model_len_capped_by_kv_capacity(tiny_llm):
    llm = tiny_llm("llama", num_kv_blocks=4, block_size=16)  # 64 tokens of KV
    assert llm.engine.max_model_len == 64
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate([list(range(4, 70))], SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate([list(range(4, 54))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 14  # up to the 64-token capacity
    check_clean(llm)


def test_kv_layout_is_the_one_source_of_max_model_len(tiny_llm):
    """Decided once by the runner's KV layout; the scheduler, input and output processors and
    the CUDA-graph buffers all see the same value (nothing flows back to the runner)."""
    llm = tiny_llm("llama", num_kv_blocks=4, block_size=16, max_model_len=200)
    eng = llm.engine
    layout = eng.runner.kv_layout
    assert layout.max_model_len == 64 and layout.capacity_tokens == 64
    assert eng.max_model_len == eng.scheduler.max_model_len == eng.output_processor.max_model_len == 64
    assert eng.input_processor.limits.max_model_len == 64
    eng.runner.capture_cuda_graphs()  # CPU stand-in graphs: block tables sized from the layout
    assert eng.runner.cuda_graphs.attn.block_tables.shape[1] == 4


def test_forward_then_sample_equals_launch(tiny_llm):
    """The runner's two halves: forward() queues the model and returns unsampled logits of the
    sampling rows; sample() of those gives what launch() gives."""
    llm = tiny_llm("qwen2")
    eng = llm.engine
    prompts = random_prompts(3, seed=77, min_len=5, max_len=20)
    for i, p in enumerate(prompts):
        eng.add_request(f"f{i}", p, SamplingParams(temperature=0, max_tokens=1))
    sched = eng.scheduler.schedule()
    fwd = eng.runner.forward(sched, None)
    assert fwd.logits.shape == (3, eng.model_config.vocab_size)
    assert [s.request_id for s in fwd.sampling_seqs] == ["f0", "f1", "f2"]
    ids = eng.runner.collect(eng.runner.sample(fwd)).token_ids
    assert ids == fwd.logits.argmax(-1).tolist()
    for s in sched.scheduled:  # the step was never processed: give the blocks back
        eng.scheduler.finish(s.seq)
    for rid in list(eng.requests):
        eng.abort_request(rid)
    check_clean(llm)


@pytest.mark.parametrize("openai", [False, True])
def test_input_processor_policies(llama_llm, openai):
    proc = llama_llm.engine.input_processor
    lim = proc.limits.max_model_len
    ids, params = proc.process([5] * 10, SamplingParams(max_tokens=None), openai=openai)
    assert ids == [5] * 10
    assert params.max_tokens == (lim - 10 if openai else None)  # the server fills "the rest"
    from miniinfer.engine.input_processor import InvalidPromptError
    if openai:
        with pytest.raises(InvalidPromptError) as ei:
            proc.process([5] * 10, SamplingParams(max_tokens=lim), openai=True)
        assert ei.value.param == "max_tokens"
    else:  # offline, the context cuts max_tokens instead
        assert proc.process([5] * 10, SamplingParams(max_tokens=lim))[1].max_tokens == lim
    with pytest.raises(InvalidPromptError) as ei:
        proc.process([5] * lim, SamplingParams(), field="messages", openai=openai)
    assert ei.value.param == "messages"
