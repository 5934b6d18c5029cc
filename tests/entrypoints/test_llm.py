"""The offline API: output shapes, prompt forms, chat, and input validation."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import TINY_VOCAB, check_clean, random_prompts, write_tiny_tokenizer
from miniinfer import LLM, CompletionOutput, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


# --- shapes -------------------------------------------------------------------------------------
def test_request_output_fields_token_prompts(llama_llm):
    prompts = random_prompts(3, seed=41, min_len=3, max_len=20)
    outs = llama_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert len(outs) == 3 and len({o.request_id for o in outs}) == 3
    for p, o in zip(prompts, outs):
        assert isinstance(o, RequestOutput) and isinstance(o.request_id, str)
        assert o.prompt is None and o.prompt_token_ids == p and o.finished
        assert isinstance(o.num_cached_tokens, int)
        (c,) = o.outputs
        assert isinstance(c, CompletionOutput) and c.index == 0
        assert len(c.token_ids) <= 6 and all(isinstance(t, int) and 0 <= t < TINY_VOCAB for t in c.token_ids)
        assert c.text == ""  # no tokenizer: token ids only
        assert c.finish_reason in ("stop", "length") and c.finished() and c.logprobs is None
        m = o.metrics
        assert m["arrival_time"] <= m["first_token_time"] <= m["finished_time"]
        assert m["num_generated_tokens"] == len(c.token_ids)
    # one prompt given as a flat list of ids, and as a dict
    single = llama_llm.generate(prompts[0], GREEDY, use_tqdm=False)
    as_dict = llama_llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)
    assert len(single) == len(as_dict) == 1
    assert single[0].outputs[0].token_ids == as_dict[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert llama_llm.generate([], GREEDY, use_tqdm=False) == []
    check_clean(llama_llm)


def test_text_prompt_forms(smol):
    tok = smol.get_tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=3)
    texts = ["The capital of Italy is", "One, two, three,"]
    outs = smol.generate(texts, sp, use_tqdm=False)
    assert [o.prompt for o in outs] == texts
    for t, o in zip(texts, outs):
        assert o.prompt_token_ids == tok.encode(t, add_special_tokens=False)
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    one = smol.generate(texts[0], sp, use_tqdm=False)
    by_dict = smol.generate([{"prompt": texts[1]}, {"prompt_token_ids": outs[0].prompt_token_ids}], sp,
                            use_tqdm=False)
    ids = smol.generate([outs[1].prompt_token_ids], sp, use_tqdm=False)
    assert one[0].outputs[0].text == outs[0].outputs[0].text
    assert by_dict[0].prompt == texts[1] and by_dict[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert by_dict[1].prompt is None and by_dict[1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert ids[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    # per-prompt sampling params
    per = smol.generate(texts, [SamplingParams(temperature=0, max_tokens=1), sp], use_tqdm=False)
    assert len(per[0].outputs[0].token_ids) == 1 and len(per[1].outputs[0].token_ids) == 3


def test_chat_one_and_several(smol):
    sp = SamplingParams(temperature=0, max_tokens=24)
    one = smol.chat([{"role": "user", "content": "What is the capital of France?"}], sp, use_tqdm=False)
    assert len(one) == 1
    assert "Paris" in one[0].outputs[0].text
    assert one[0].prompt.rstrip().endswith("assistant")  # the rendered template
    convs = [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    outs = smol.chat(convs, sp, use_tqdm=False)
    assert len(outs) == 3
    assert "Paris" in outs[0].outputs[0].text
    assert "4" in outs[1].outputs[0].text
    assert outs[2].outputs[0].text == one[0].outputs[0].text  # same conversation, same answer
    assert outs[2].num_cached_tokens > 0  # its prompt was cached by the first call
    for o in outs:
        assert o.outputs[0].finish_reason == "stop" and "<|im_end|>" not in o.outputs[0].text


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, limit", [
    (dict(temperature=-0.5), "temperature", ">= 0"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(top_k=0), "top_k", ">= 1"),
    (dict(top_k=-2), "top_k", "-1"),
    (dict(max_tokens=0), "max_tokens", ">= 1"),
    (dict(n=0), "n", ">= 1"),
    (dict(min_p=1.5), "min_p", "[0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    (dict(presence_penalty=3.0), "presence_penalty", "[-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty", "[-2, 2]"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens", "max_tokens"),
    (dict(logprobs=21), "logprobs", "[0, 20]"),
    (dict(stop=[""]), "stop", "non-empty"),
])
def test_bad_sampling_params(kwargs, field, limit):
    with pytest.raises(ValueError) as ei:
        SamplingParams(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(field) and limit in msg, msg


def test_params_changed_after_construction_are_checked(llama_llm):
    sp = SamplingParams(temperature=0)
    sp.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        llama_llm.generate([[5, 6, 7]], sp, use_tqdm=False)
    check_clean(llama_llm)


def test_bad_prompts(tiny_llm):
    llm = tiny_llm("llama", max_model_len=64)
    for bad in ([[]], {"prompt_token_ids": []}):
        with pytest.raises(ValueError, match="prompt must not be empty"):
            llm.generate(bad, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError) as ei:
        llm.generate([list(range(4, 104))], GREEDY, use_tqdm=False)
    assert "100" in str(ei.value) and "64" in str(ei.value) and "max_model_len" in str(ei.value)
    with pytest.raises(ValueError, match="max_model_len"):  # room for one token is needed
        llm.generate([list(range(4, 68))], GREEDY, use_tqdm=False)
    for ids in ([5, TINY_VOCAB], [5, -1], [5, 6.0]):
        with pytest.raises(ValueError) as ei:
            llm.generate([ids], GREEDY, use_tqdm=False)
        assert f"[0, {TINY_VOCAB})" in str(ei.value)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate({"text": "x"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate([[5], [6]], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs must be <= 3"):
        tiny_llm("llama", max_logprobs=3).generate([[5, 6]], SamplingParams(logprobs=4), use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    check_clean(llm)
    # without chunked prefill a prompt must fit one step's token budget
    nochunk = tiny_llm("llama", enable_chunked_prefill=False, max_num_batched_tokens=32)
    with pytest.raises(ValueError) as ei:
        nochunk.generate([list(range(4, 44))], GREEDY, use_tqdm=False)
    assert "40" in str(ei.value) and "max_num_batched_tokens is 32" in str(ei.value)
    assert len(nochunk.generate([list(range(4, 36))], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6
    check_clean(nochunk)


def test_empty_text_prompt(smol):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        smol.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        smol.generate({"prompt": ""}, GREEDY, use_tqdm=False)


def test_failing_request_in_batch_leaves_engine_usable(llama_llm):
    good = random_prompts(3, seed=42, min_len=5, max_len=30)
    alone = [o.outputs[0].token_ids for o in llama_llm.generate(good, GREEDY, use_tqdm=False)]
    with pytest.raises(ValueError, match="prompt token ids"):
        llama_llm.generate([good[0], good[1], [1, 2, 10 ** 6], good[2]], GREEDY, use_tqdm=False)
    check_clean(llama_llm)  # the two already-added requests were aborted
    outs = llama_llm.generate(good, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    check_clean(llama_llm)


def test_error_mid_run_leaves_engine_usable(tiny_llm):
    """A forward that raises (e.g. Ctrl-C) aborts the batch; nothing half-computed may be
    left behind in the prefix cache."""
    llm = tiny_llm("qwen2", block_size=8, max_num_batched_tokens=32)
    prompts = random_prompts(4, seed=43, min_len=30, max_len=60)
    expect = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    llm.engine.kv.reset_prefix_cache()
    runner = llm.engine.runner
    orig, calls = runner.launch, [0]

    def flaky(sched, prev):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return orig(sched, prev)

    runner.launch = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        runner.launch = orig
    check_clean(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expect
    check_clean(llm)


# --- bad models -----------------------------------------------------------------------------------
def test_unknown_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError) as ei:
        LLM(missing, progress=False)
    assert missing in str(ei.value)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "missing.gguf"), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(empty), progress=False)


def test_unsupported_architecture(tmp_path, tiny_model):
    folder, _ = tiny_model("llama")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(folder, "model.safetensors"), bad / "model.safetensors")
    for kwargs in ({}, {"load_format": "dummy"}):
        with pytest.raises(ValueError) as ei:
            LLM(str(bad), progress=False, **kwargs)
        msg = str(ei.value)
        assert "GPT2LMHeadModel" in msg
        assert all(a in msg for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"))


def test_missing_weights(tmp_path, tiny_model):
    folder, _ = tiny_model("llama")
    bad = tmp_path / "noweights"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(bad), progress=False)


def test_gguf_unsupported_quantization(tmp_path):
    import gguf
    path = str(tmp_path / "bad.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(TINY_VOCAB)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((TINY_VOCAB, 16)).astype(np.float32))
    tq = gguf.GGMLQuantizationType.TQ2_0
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(rng.standard_normal((16, 256)).astype(np.float32), tq),
                 raw_dtype=tq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ValueError) as ei:
        LLM(path, tokenizer=tok, dtype="float32", progress=False, num_kv_blocks=8)
    msg = str(ei.value)
    assert "TQ2_0" in msg and "Q4_K" in msg and "Q8_0" in msg


def test_bad_engine_args(tiny_model):
    folder, _ = tiny_model("llama")
    for kwargs, field in ((dict(block_size=12), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
                          (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
                          (dict(dtype="float8"), "dtype"), (dict(max_model_len=10 ** 6), "max_model_len"),
                          (dict(num_kv_blocks=0), "num_kv_blocks")):
        with pytest.raises(ValueError, match=field):
            LLM(folder, progress=False, device="cpu", **kwargs)


def test_offline_chunk_budget_follows_vllm(monkeypatch):
    """``LLM``'s default step budget is vLLM's offline one: 16,384 tokens on a GPU of at least
    70 GiB other than an A100, else 8,192 (the engine's and the server's)."""
    from types import SimpleNamespace

    import torch

    from miniinfer.config import EngineConfig, offline_max_num_batched_tokens
    assert offline_max_num_batched_tokens("cpu") == 8192 == EngineConfig(device="cpu").max_num_batched_tokens
    assert offline_max_num_batched_tokens(torch.device("cpu")) == 8192
    cards = {"NVIDIA H200": (141, 16384), "NVIDIA H100 80GB HBM3": (80, 16384),
             "NVIDIA A100-SXM4-80GB": (80, 8192), "NVIDIA L4": (24, 8192)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, (gib, budget) in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, _n=name, _g=gib: SimpleNamespace(name=_n, total_memory=_g * 2 ** 30))
        assert offline_max_num_batched_tokens("cuda") == budget, name
        assert offline_max_num_batched_tokens("auto") == budget, name
