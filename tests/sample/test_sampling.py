"""Sampling: seeds, greedy equivalences, distributions, penalties, logprobs and stop rules."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import TINY_EOS, check_clean, random_prompts
from miniinfer import SamplingParams
from miniinfer.sample.logits_processors import apply_penalties
from miniinfer.sample.metadata import SamplingMetadata
from miniinfer.sample.sampler import apply_top_k_top_p_min_p, sample
from miniinfer.engine.sequence import Sequence


def _seq(tokens, n_prompt, **params):
    return Sequence("r", 0, list(tokens), n_prompt, SamplingParams(**params))


def _batch(seqs, vocab, eos=()):
    return SamplingMetadata.build(seqs, vocab, torch.device("cpu"), eos)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, seed=31, min_len=3, max_len=30)


# --- the sampler on fixed logits ----------------------------------------------------------------
def test_temperature_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    for temp in (0.5, 1.0, 2.0):
        seqs = [_seq([0], 1, temperature=temp) for _ in range(n)]
        out = sample(logits.repeat(n, 1), _batch(seqs, 5))
        freq = torch.bincount(out.token_ids, minlength=5).float() / n
        expect = (logits / temp).softmax(-1)
        assert (freq - expect).abs().max() < 0.015, (temp, freq, expect)


def test_top_k_top_p_min_p_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    p = logits.softmax(-1)  # [0.46, 0.28, 0.17, 0.06, 0.02, 0.003] roughly
    n = 20000
    cases = {
        "top_k=2": (dict(top_k=2), torch.tensor([1, 1, 0, 0, 0, 0.])),
        # a token is kept while the mass strictly before it is < top_p: 0.46 + 0.28 < 0.8
        "top_p=0.8": (dict(top_p=0.8), torch.tensor([1, 1, 1, 0, 0, 0.])),
        "top_p=0.7": (dict(top_p=0.7), torch.tensor([1, 1, 0, 0, 0, 0.])),
        "top_p=0.4": (dict(top_p=0.4), torch.tensor([1, 0, 0, 0, 0, 0.])),
        # min_p: keep tokens with p >= 0.3 * p_max
        "min_p=0.3": (dict(min_p=0.3), (p >= 0.3 * p.max()).float()),
        # top-p applies to the distribution renormalized after top-k (as vLLM): the top
        # token holds 0.51 of the top 3, so top_p=0.5 keeps it alone
        "top_k=3,top_p=0.5": (dict(top_k=3, top_p=0.5), torch.tensor([1, 0, 0, 0, 0, 0.])),
        "top_k=3,top_p=0.6": (dict(top_k=3, top_p=0.6), torch.tensor([1, 1, 0, 0, 0, 0.])),
    }
    for name, (kw, keep) in cases.items():
        seqs = [_seq([0], 1, temperature=1.0, **kw) for _ in range(n)]
        out = sample(logits.repeat(n, 1), _batch(seqs, 6))
        freq = torch.bincount(out.token_ids, minlength=6).float() / n
        expect = p * keep / (p * keep).sum()
        assert (freq - expect).abs().max() < 0.015, (name, freq, expect)
        assert freq[keep == 0].sum() == 0, name


def test_filter_masks_exactly():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    seqs = [_seq([0], 1, top_k=2), _seq([0], 1, top_p=0.999999), _seq([0], 1, min_p=0.5)]
    out = apply_top_k_top_p_min_p(logits.clone(), _batch(seqs, 4))
    inf = float("-inf")
    assert out[0].tolist() == [3.0, 2.0, inf, inf]
    assert out[1].tolist() == [3.0, 2.0, 1.0, 0.0]  # the tail is kept while mass < top_p
    p = logits[2].softmax(-1)
    assert out[2].tolist() == [v if pi >= 0.5 * p[0] else inf for v, pi in zip(logits[2].tolist(), p)]


def test_greedy_rows_ignore_noise():
    logits = torch.randn(8, 50)
    seqs = [_seq([0], 1, temperature=0.0 if i % 2 else 1.0) for i in range(8)]
    out = sample(logits, _batch(seqs, 50))
    assert torch.equal(out.token_ids[1::2], logits[1::2].argmax(-1))


def test_seeded_rows_do_not_depend_on_batch():
    """A seeded row draws its noise from its own generator: same tokens whatever the batch."""
    logits = torch.randn(1, 100)

    def run(with_mates: bool) -> list[int]:
        s = _seq([0], 1, seed=7)
        s.generator = torch.Generator().manual_seed(7)
        toks = []
        for k in range(10):
            others = [_seq([0], 1) for _ in range(k % 4 if with_mates else 0)]
            batch_logits = torch.cat([torch.randn(len(others), 100), logits])
            toks.append(int(sample(batch_logits, _batch(others + [s], 100)).token_ids[-1]))
        return toks

    alone = run(False)
    assert alone == run(True) and len(set(alone)) > 1


def test_apply_penalties_as_defined():
    vocab = 6
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0]])
    # prompt has tokens 0, 1; output has 2 (twice) and 3 (once)
    s = _seq([0, 1, 2, 3, 2], 2, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), _batch([s], vocab).processor_state("penalties"))[0]
    expect = [
        2.0 / 2,  # prompt token, positive: divided
        -1.0 * 2,  # prompt token, negative: multiplied
        0.5 / 2 - 0.25 * 2 - 0.5,  # output twice: repetition, frequency x2, presence
        -0.5 * 2 - 0.25 * 1 - 0.5,
        1.0,  # unseen
        3.0,
    ]
    torch.testing.assert_close(out, torch.tensor(expect), rtol=0, atol=1e-6)
    # a row without penalties in the same batch is untouched
    plain = _seq([0, 1, 2, 3, 2], 2)
    out2 = apply_penalties(logits.repeat(2, 1), _batch([s, plain], vocab).processor_state("penalties"))
    torch.testing.assert_close(out2[1], logits[0])


def test_sampler_logprobs_fields():
    logits = torch.randn(3, 40)
    seqs = [_seq([0], 1, temperature=0.0, logprobs=5), _seq([0], 1, temperature=1.0, logprobs=2),
            _seq([0], 1, temperature=1.0)]
    out = sample(logits, _batch(seqs, 40))
    lp = logits.log_softmax(-1)
    top = lp.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_ids, top.indices)
    for i in range(3):
        t = int(out.token_ids[i])
        assert math.isclose(float(out.sampled_logprob[i]), float(lp[i, t]), abs_tol=1e-6)
        assert int(out.sampled_rank[i]) == int((lp[i] > lp[i, t]).sum()) + 1
    assert int(out.sampled_rank[0]) == 1


def test_min_tokens_bans_stop_tokens_in_sampler():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    # EOS (1) and stop token (2) are banned until min_tokens outputs exist
    s = _seq([0, 3], 1, temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert int(sample(logits, _batch([s], 4, eos=[1])).token_ids[0]) == 3
    s_done = _seq([0, 3, 3, 3], 1, temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert int(sample(logits, _batch([s_done], 4, eos=[1])).token_ids[0]) == 1
    s_ign = _seq([0, 3], 1, temperature=0.0, min_tokens=3, ignore_eos=True)
    assert int(sample(logits, _batch([s_ign], 4, eos=[1])).token_ids[0]) == 1
    # logprobs still describe the raw logits
    s_lp = _seq([0], 1, temperature=0.0, min_tokens=2, logprobs=1)
    out = sample(logits, _batch([s_lp], 4, eos=[1]))
    assert int(out.top_ids[0, 0]) == 1 and int(out.token_ids[0]) == 2


# --- through the engine (tiny Llama) ------------------------------------------------------------
def _toks(outs):
    return [c.token_ids for o in outs for c in o.outputs]


def test_seeded_sampling_reproducible_and_batch_independent(prompts, tiny_llm):
    llm = tiny_llm("llama", max_num_batched_tokens=40, num_kv_blocks=10)
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=20)
    target = prompts[0]
    alone = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    # in a crowd of unseeded and other-seeded requests, under KV pressure (preemption)
    mates = random_prompts(10, seed=32, min_len=10, max_len=40)
    params = [SamplingParams(temperature=1.0, max_tokens=20, seed=(None if i % 2 else 99 + i))
              for i in range(len(mates))]
    outs = llm.generate(mates[:5] + [target] + mates[5:], params[:5] + [sp] + params[5:], use_tqdm=False)
    assert outs[5].outputs[0].token_ids == alone
    assert llm.engine.stats()["num_preemptions"] > 0
    other = llm.generate([target], SamplingParams(temperature=1.0, seed=4321, max_tokens=20),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone
    check_clean(llm)


def test_n_choices_follow_seed_plus_index(prompts, llama_llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=50, max_tokens=12)
    out = llama_llm.generate([prompts[1]], sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    toks = [c.token_ids for c in out.outputs]
    assert len({tuple(t) for t in toks}) == 3
    for i in range(3):
        single = llama_llm.generate([prompts[1]], SamplingParams(temperature=1.0, seed=50 + i, max_tokens=12),
                                    use_tqdm=False)[0].outputs[0].token_ids
        assert single == toks[i]
    unseeded = llama_llm.generate([prompts[1]], SamplingParams(n=4, temperature=1.0, max_tokens=12),
                                  use_tqdm=False)[0]
    assert len(unseeded.outputs) == 4 and len({tuple(c.token_ids) for c in unseeded.outputs}) > 1
    check_clean(llama_llm)


def test_sampling_filters_that_reduce_to_greedy(prompts, llama_llm):
    greedy = _toks(llama_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False))
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-4)):
        kw.setdefault("temperature", 1.0)
        got = _toks(llama_llm.generate(prompts, SamplingParams(max_tokens=12, **kw), use_tqdm=False))
        assert got == greedy, kw
    # plain sampling at temperature 1 is not greedy
    sampled = _toks(llama_llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=12),
                                       use_tqdm=False))
    assert sampled != greedy
    check_clean(llama_llm)


def test_penalized_greedy_matches_manual(prompts, llama_llm):
    """Greedy with all three penalties == argmax of the penalized raw logits, step by step."""
    sp = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.8, presence_penalty=0.7,
                        frequency_penalty=0.4)
    for prompt in prompts[:3]:
        got = llama_llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        toks = list(prompt)
        for _ in range(10):
            logits = llama_llm.engine.runner.forward_logits(toks)[-1].clone()
            out_counts = torch.bincount(torch.tensor(toks[len(prompt):], dtype=torch.long), minlength=512)
            seen = torch.zeros(512, dtype=torch.bool)
            seen[torch.tensor(prompt)] = True
            seen |= out_counts > 0
            logits = torch.where(seen & (logits > 0), logits / 1.8, torch.where(seen, logits * 1.8, logits))
            logits -= 0.4 * out_counts + 0.7 * (out_counts > 0).float()
            toks.append(int(logits.argmax()))
        assert got == toks[len(prompt):]
        plain = llama_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10),
                                   use_tqdm=False)[0].outputs[0].token_ids
        assert plain != got or len(set(plain)) == len(plain)
    check_clean(llama_llm)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_match_forward_logits(prompts, llama_llm, temperature):
    n_top = 5
    sp = SamplingParams(temperature=temperature, seed=9, max_tokens=8, logprobs=n_top)
    outs = llama_llm.generate(prompts[:3], sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        comp = out.outputs[0]
        assert len(comp.logprobs) == len(comp.token_ids) == 8
        full = llama_llm.engine.runner.forward_logits(prompt + comp.token_ids).log_softmax(-1)
        for j, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            ref = full[len(prompt) - 1 + j]
            top = ref.topk(n_top)
            assert tok in entry
            assert len(entry) in (n_top, n_top + 1)
            for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
                assert t in entry, (j, t)
                assert abs(entry[t].logprob - v) < 1e-4 and entry[t].rank == rank
            assert abs(entry[tok].logprob - float(ref[tok])) < 1e-4
            assert entry[tok].rank == int((ref > ref[tok]).sum()) + 1
            if temperature == 0:
                assert entry[tok].rank == 1
    # logprobs=0: only the sampled token
    out = llama_llm.generate([prompts[0]], SamplingParams(temperature=1.0, seed=1, max_tokens=4, logprobs=0),
                             use_tqdm=False)[0].outputs[0]
    assert all(list(e) == [t] for t, e in zip(out.token_ids, out.logprobs))
    check_clean(llama_llm)


def test_logprobs_limit(llama_llm):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_max_tokens_and_stop_token_ids(prompts, llama_llm):
    ref = llama_llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 12 and ref.stop_reason is None
    toks = ref.token_ids
    k = next(i for i in range(3, 12) if toks[i] not in toks[:i])
    out = llama_llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[toks[k]]),
                             use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == toks[k]
    # min_tokens past the stop token: it is banned (not merely ignored) until then
    out = llama_llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=12, min_tokens=k + 2,
                                                          stop_token_ids=[toks[k]]), use_tqdm=False)[0].outputs[0]
    assert toks[k] not in out.token_ids[:k + 2]
    assert out.token_ids[:k] == toks[:k]
    check_clean(llama_llm)


def test_tiny_eos_stops_unless_ignored(prompts, tiny_llm):
    """Random tiny models rarely pick EOS, so declare the first greedy token an EOS id: the
    request then stops right there, runs on with ignore_eos, and min_tokens bans it."""
    llm = tiny_llm("llama")
    ref = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    first = ref.token_ids[0]
    saved = set(llm.engine.eos_token_ids)
    llm.engine.eos_token_ids.add(first)  # pretend the first greedy token is an EOS (it may be one)
    llm.engine.runner.eos_token_ids = sorted(llm.engine.eos_token_ids)
    try:
        stopped = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=10),
                               use_tqdm=False)[0].outputs[0]
        assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason is None
        ignored = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
        assert ignored.token_ids == ref.token_ids and ignored.finish_reason == "length"
        held = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=10, min_tokens=3),
                            use_tqdm=False)[0].outputs[0]
        assert first not in held.token_ids[:3] and len(held.token_ids) >= 3
    finally:
        llm.engine.eos_token_ids = saved
        llm.engine.runner.eos_token_ids = sorted(saved)
    assert saved == {TINY_EOS}
    check_clean(llm)


# --- SmolLM2: EOS, min_tokens, stop strings -----------------------------------------------------
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def france_greedy(smol_llm):
    out = smol_llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.token_ids[-1] in smol_llm.engine.eos_token_ids
    assert "Paris" in comp.text
    return comp


def test_smol_min_tokens_and_ignore_eos(smol, france_greedy):
    n = len(france_greedy.token_ids)  # answer + <|im_end|>
    eos = smol.engine.eos_token_ids
    out = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=n + 6, min_tokens=n + 2),
                    use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= n + 2
    assert not any(t in eos for t in out.token_ids[:n + 2])
    assert out.token_ids[:n - 1] == france_greedy.token_ids[:-1]
    out = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=n + 3, ignore_eos=True),
                    use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == n + 3 and out.finish_reason == "length"
    assert out.token_ids[:n] == france_greedy.token_ids  # EOS generated, then ignored


def test_smol_stop_strings(smol, france_greedy):
    text = france_greedy.text
    assert text.startswith("The capital of France is Paris")
    out = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=["Paris"]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.text == text[:text.index("Paris")]
    assert comp.finish_reason == "stop" and comp.stop_reason == "Paris"
    # the first of several stop strings to appear wins; include_stop_str_in_output keeps it
    comp = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=["Paris", "capital"],
                                            include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert comp.text == "The capital" and comp.stop_reason == "capital"
    # a stop string spanning a token boundary, ending mid-token
    comp = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=["of Fr"]),
                     use_tqdm=False)[0].outputs[0]
    assert comp.text == "The capital " and comp.finish_reason == "stop" and comp.stop_reason == "of Fr"
    # a stop string that never appears changes nothing
    comp = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=["Berlin"]),
                     use_tqdm=False)[0].outputs[0]
    assert comp.text == text and comp.token_ids == france_greedy.token_ids


def test_smol_logprobs_decoded(smol):
    out = smol.chat(FRANCE, SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)[0]
    tok = smol.get_tokenizer()
    comp = out.outputs[0]
    full = smol.engine.runner.forward_logits(out.prompt_token_ids + comp.token_ids).log_softmax(-1)
    n = len(out.prompt_token_ids)
    for j, (t, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        assert entry[t].rank == 1 and entry[t].decoded_token == tok.decode([t])
        assert abs(entry[t].logprob - float(full[n - 1 + j, t])) < 1e-4
        assert len(entry) == 3
