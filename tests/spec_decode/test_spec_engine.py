"""Speculative decoding on the embedded SmolLM2 (fp32, real text): greedy output identical with
each drafter (n-gram, draft model, the shipped EAGLE head) on and off, at batch 1 and 8, under chunked prefill and preemption; a draft model
equal to the target accepts every draft; the cache stays consistent after rejected drafts;
stops and max_tokens landing mid-draft; logprobs of accepted tokens."""
from __future__ import annotations

import pytest

from helpers import check_clean
from miniinfer import LLM, SamplingParams
from miniinfer.loader.embedded import embedded_model_path

PROMPTS = [
    "Write a Python function that returns the sum of a list, then show it called on [1, 2, 3].",
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    "List the numbers from 1 to 20, separated by commas.",
    "What is the capital of France?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "# Rewrite the function above iteratively:\n",
    "Write a short poem about the sea.",
    "Translate to French: good morning, good evening, good night.",
    "Explain what a hash map is in two sentences.",
]
MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _chat(llm, prompts=PROMPTS):
    return [llm.engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(smol_llm):
    return _ids(smol_llm.generate(_chat(smol_llm), GREEDY, use_tqdm=False))


def _spec(**kw):
    spec = kw.pop("spec")
    return LLM(None, dtype="float32", max_model_len=2048, progress=False, speculative_config=spec, **kw)


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
DRAFT = {"method": "draft_model", "model": embedded_model_path(), "num_speculative_tokens": 3}


EAGLE = {"method": "eagle", "num_speculative_tokens": 3}  # the head shipped for the embedded model
EAGLE_TREE = {"method": "eagle", "num_speculative_tokens": 4, "eagle_topk": 4, "num_draft_tokens": 10}  # EAGLE-2


@pytest.fixture(scope="module")
def ngram_llm():
    return _spec(spec=NGRAM)


@pytest.fixture(scope="module")
def draft_llm():
    return _spec(spec=DRAFT)


@pytest.mark.parametrize("which", ["ngram", "draft", "eagle", "eagle_tree"])
def test_greedy_identical_batch_1_and_8(which, ngram_llm, draft_llm, reference):
    llm = {"ngram": ngram_llm, "draft": draft_llm}.get(which) or _spec(spec=EAGLE_TREE if which == "eagle_tree" else EAGLE)
    prompts = _chat(llm)
    assert _ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference  # batch 8
    one_by_one = [_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert one_by_one == reference
    stats = llm.engine.stats()
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    m = llm.generate(prompts[1], GREEDY, use_tqdm=False)[0].metrics  # per request, too
    assert m["spec_num_draft_tokens"] >= m["spec_num_accepted_tokens"] > 0
    check_clean(llm)


def test_draft_equal_to_target_accepts_everything(draft_llm):
    before = draft_llm.engine.stats()
    draft_llm.generate(_chat(draft_llm), GREEDY, use_tqdm=False)
    after = draft_llm.engine.stats()
    drafted = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    assert drafted > 50 and accepted == drafted


@pytest.mark.parametrize("spec", [NGRAM, DRAFT, EAGLE, EAGLE_TREE], ids=["ngram", "draft", "eagle", "eagle_tree"])
def test_chunked_prefill_and_preemption(spec, reference):
    # 12 blocks of 16 tokens for 8 sequences of ~40 + 32 tokens: preemption is certain;
    # a 64-token budget: the 77-token code prompt is prefilled in two chunks, drafts get trimmed
    llm = _spec(spec=spec, num_kv_blocks=12, max_num_batched_tokens=64, max_num_seqs=8)
    assert _ids(llm.generate(_chat(llm), GREEDY, use_tqdm=False)) == reference
    assert llm.engine.stats()["num_preemptions"] > 0
    check_clean(llm)


def test_cache_consistent_after_rejected_drafts(ngram_llm, reference):
    """Rejected drafts wrote K/V into pages that later hold other tokens; run every prompt
    again so its pages come from the prefix cache: a wrong page would change the output."""
    prompts = _chat(ngram_llm)
    ngram_llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = ngram_llm.engine.stats()
    assert stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]  # some were rejected
    # continue each finished conversation: its whole history (prompt + output) is a cached prefix
    full = [p + ngram_llm.engine.tokenizer.decode(ids) for p, ids in zip(prompts, reference)]
    hits = ngram_llm.engine.stats()["prefix_cache_hits"]
    again = ngram_llm.generate(full, GREEDY, use_tqdm=False)
    assert ngram_llm.engine.stats()["prefix_cache_hits"] > hits
    base = LLM(None, dtype="float32", max_model_len=2048, progress=False, enable_prefix_caching=False)
    assert _ids(again) == _ids(base.generate(full, GREEDY, use_tqdm=False))
    check_clean(ngram_llm)


def test_stop_and_max_tokens_mid_draft(ngram_llm, smol_llm):
    prompt = _chat(ngram_llm, ["List the numbers from 1 to 20, separated by commas."])
    for params in (SamplingParams(temperature=0, max_tokens=7), SamplingParams(temperature=0, max_tokens=40, stop=["9"]),
                   SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[30])):
        want = smol_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        got = ngram_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    check_clean(ngram_llm)


def test_logprobs_of_accepted_tokens(ngram_llm, smol_llm):
    prompt = _chat(ngram_llm, [PROMPTS[2]])
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    want = smol_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    got = ngram_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.logprobs)
    for a, b in zip(got.logprobs, want.logprobs):
        assert list(a) == list(b)
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) < 1e-3 and a[t].rank == b[t].rank


def test_sampling_and_n_choices_run_clean(ngram_llm):
    outs = ngram_llm.generate(_chat(ngram_llm)[:3], SamplingParams(temperature=0.8, top_p=0.9, seed=5, n=2,
                                                                    max_tokens=32), use_tqdm=False)
    assert all(len(o.outputs) == 2 and all(c.token_ids for c in o.outputs) for o in outs)
    check_clean(ngram_llm)


@pytest.mark.parametrize("bad,match", [
    ({"method": "medusa"}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "draft_model"}, "speculative_config.model"),
    ({"method": "ngram", "eagle_topk": 4}, "needs method 'eagle'"),
    ({"method": "eagle", "eagle_topk": 17}, "eagle_topk must be in"),
    ({"method": "eagle", "eagle_topk": 8, "num_speculative_tokens": 10}, "tree window"),
    ({"method": "eagle", "eagle_topk": 4, "num_draft_tokens": 64}, "num_draft_tokens must be in \\[1, 63\\]"),
    ({"method": "eagle", "num_speculative_tokens": 3, "num_draft_tokens": 4}, "num_draft_tokens must be in \\[1, 3\\]"),
    ({"method": "ngram", "k": 3}, "unknown key"),
    ({"method": "ngram", "prompt_lookup_min": "2"}, "prompt_lookup_min must be an integer"),
    ({"method": "ngram", "disable_by_batch_size": "8"}, "disable_by_batch_size must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be an integer"),
    ({"method": "ngram", "model": "x.gguf"}, "not used by method 'ngram'"),
    ({"method": "eagle", "model": "/nonexistent/head.safetensors"}, "EAGLE head file.*does not exist"),
    ({"method": "draft_model", "model": "/nonexistent/draft.gguf"}, "the draft model.*does not exist"),
])
def test_bad_config_is_a_clear_error(bad, match):
    from miniinfer.config import EngineConfig
    with pytest.raises(ValueError, match=match):
        EngineConfig(speculative_config=bad)


def test_eagle_head_needs_a_file_for_other_models(tiny_model):
    with pytest.raises(ValueError, match="EAGLE head file"):
        LLM(tiny_model("llama")[0], dtype="float32", progress=False, speculative_config={"method": "eagle"})


def test_eagle_with_a_draft_vocabulary(tmp_path, reference):
    """FR-Spec: the head drafts over a token subset listed beside its file; still lossless."""
    import json
    import shutil

    from miniinfer.spec_decode.eagle import EMBEDDED_HEAD
    head = tmp_path / "head.safetensors"
    shutil.copy(EMBEDDED_HEAD, head)
    vocab = sorted({t for ids in reference for t in ids} | set(range(4096)))
    (tmp_path / "head.json").write_text(json.dumps({"draft_vocab": vocab}))
    llm = _spec(spec={"method": "eagle", "num_speculative_tokens": 3, "model": str(head)})
    drafter = llm.engine.proposer
    assert drafter.vocab_w is not None and drafter.vocab_w.shape[0] == len(vocab)
    assert _ids(llm.generate(_chat(llm), GREEDY, use_tqdm=False)) == reference
    assert llm.engine.stats()["spec_num_accepted_tokens"] > 0
    check_clean(llm)


def test_eagle_head_graph_paths_match(reference):
    """The head's CUDA-graph paths (CPU stand-in graphs: same static buffers and padding):
    draft steps replay decode graphs, single-sequence catch-ups replay prefill graphs."""
    llm = _spec(spec=EAGLE, max_num_seqs=8)
    drafter = llm.engine.proposer
    drafter.capture_cuda_graphs(llm.engine)
    used = {"decode": 0, "prefill": 0}
    for name in ("decode", "prefill"):
        orig = getattr(drafter.graphs, f"replay_{name}")

        def counted(batch, _orig=orig, _name=name):
            used[_name] += 1
            return _orig(batch)
        setattr(drafter.graphs, f"replay_{name}", counted)
    prompts = _chat(llm)
    eager = _spec(spec=EAGLE, max_num_seqs=8)
    for run in (lambda m: m.generate(prompts, GREEDY, use_tqdm=False),
                lambda m: [m.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts[:2]]):
        got = _ids(run(llm))
        assert got == reference[:len(got)]
        _ids(run(eager))
    assert used["decode"] > 0 and used["prefill"] > 0
    s, e = llm.engine.stats(), eager.engine.stats()
    assert s["spec_num_accepted_tokens"] > 0
    assert (s["spec_num_draft_tokens"], s["spec_num_accepted_tokens"]) == \
        (e["spec_num_draft_tokens"], e["spec_num_accepted_tokens"])  # the same drafts
    check_clean(llm)


def test_draft_and_verify_time_metrics(ngram_llm):
    """Drafting and verify wall time: engine totals and per-step means in ``stats()``, each
    request's share in its metrics; the shares add up to the totals."""
    before = ngram_llm.engine.stats()
    outs = ngram_llm.generate(_chat(ngram_llm, PROMPTS[:3]), GREEDY, use_tqdm=False)
    after = ngram_llm.engine.stats()
    draft = after["spec_draft_time_s"] - before["spec_draft_time_s"]
    verify = after["spec_verify_time_s"] - before["spec_verify_time_s"]
    assert draft > 0 and verify > draft  # the verify runs the 30-layer target, the n-gram lookup is NumPy
    assert after["spec_draft_ms_per_step"] > 0 and after["spec_verify_ms_per_step"] > 0
    per_request = [o.metrics for o in outs]
    assert sum(m["spec_draft_time_s"] for m in per_request) == pytest.approx(draft, rel=1e-6)
    assert sum(m["spec_verify_time_s"] for m in per_request) == pytest.approx(verify, rel=1e-6)


def test_seeded_sampling_does_not_depend_on_the_batch(ngram_llm):
    """A seeded request's tokens are the same alone and beside a greedy request whose drafts
    are verified in the same steps (every step of a speculative engine draws a seeded request's
    tokens by position)."""
    prompts = _chat(ngram_llm, PROMPTS[:2])
    seeded = SamplingParams(temperature=0.8, seed=1, max_tokens=24)
    alone = ngram_llm.generate(prompts[:1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    both = ngram_llm.generate(prompts, [seeded, GREEDY], use_tqdm=False)
    assert both[0].outputs[0].token_ids == alone
    assert both[1].metrics["spec_num_draft_tokens"] > 0  # the neighbour did speculate
    again = ngram_llm.generate(prompts[:1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    check_clean(ngram_llm)


def test_spec_metrics_present_without_drafts(ngram_llm):
    out = ngram_llm.generate(_chat(ngram_llm, ["Say hi."]), SamplingParams(temperature=0, max_tokens=2),
                             use_tqdm=False)[0]
    assert {"spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_draft_time_s",
            "spec_verify_time_s"} <= set(out.metrics)
