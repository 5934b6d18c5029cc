"""Issue #11, kind 1: finish semantics. One place decides finish_reason / stop_reason and the
final text, the same for streaming and non-streaming (embedded SmolLM2, real text)."""
from __future__ import annotations

import random

import pytest

from helpers import check_clean
from miniinfer import SamplingParams

PROMPT = "The three primary colors are"
CHINESE = "用中文回答：中国的首都是哪里？"


def _one(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def _streamed_text(llm, prompt, params) -> tuple[str, object]:
    """Run one request through the engine with stream=True, joining the text deltas."""
    eng = llm.engine
    eng.add_request("stream-check", prompt, params, stream=True)
    seen, last = "", None
    while eng.has_unfinished_requests():
        for out in eng.step():
            text = out.outputs[0].text
            assert text.startswith(seen), "streamed text was retracted"
            seen, last = text, out
    eng.on_idle()
    return seen, last.outputs[0]


def test_min_tokens_holds_back_stop_strings(smol):
    out = _one(smol, PROMPT, temperature=0, max_tokens=12, min_tokens=8, stop=[" "])
    assert len(out.token_ids) >= 8, (out.text, out.token_ids)
    assert out.finish_reason in ("stop", "length")


def test_stop_token_text_is_not_in_the_output(smol):
    greedy = _one(smol, PROMPT, temperature=0, max_tokens=6)
    third = greedy.token_ids[2]
    tok = smol.get_tokenizer()
    out = _one(smol, PROMPT, temperature=0, max_tokens=6, stop_token_ids=[third])
    assert out.token_ids == greedy.token_ids[:3]
    assert out.finish_reason == "stop" and out.stop_reason == third
    assert out.text == tok.decode(greedy.token_ids[:2])
    kept = _one(smol, PROMPT, temperature=0, max_tokens=6, stop_token_ids=[third], include_stop_str_in_output=True)
    assert kept.text == tok.decode(greedy.token_ids[:3])


@pytest.mark.parametrize("max_tokens", range(1, 10))
def test_cut_mid_character_drops_the_incomplete_bytes(smol, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    out = smol.generate(CHINESE, params, use_tqdm=False)[0].outputs[0]
    assert "\ufffd" not in out.text, repr(out.text)
    streamed, final = _streamed_text(smol, CHINESE, params)
    assert final.text == out.text == streamed
    assert final.finish_reason == out.finish_reason == "length"


def test_finish_invariants_over_random_requests(smol):
    """A table of random stop configurations: every finish obeys the same rules, streaming or not."""
    rng = random.Random(11)
    tok = smol.get_tokenizer()
    base = _one(smol, PROMPT, temperature=0, max_tokens=24, ignore_eos=True).token_ids
    words = [w for w in tok.decode(base).split(" ") if w]
    for case in range(24):
        kw = dict(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.5)
        kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
        if rng.random() < 0.5:
            kw["stop_token_ids"] = [rng.choice(base)]
        if rng.random() < 0.5:
            kw["stop"] = [rng.choice(words)[:rng.randint(1, 3)]]
        kw["include_stop_str_in_output"] = rng.random() < 0.3
        params = SamplingParams(**kw)
        out = smol.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
        streamed, final = _streamed_text(smol, PROMPT, params)
        assert (final.text, final.token_ids, final.finish_reason) == (out.text, out.token_ids, out.finish_reason), kw
        assert streamed == out.text, kw
        n = len(out.token_ids)
        if out.finish_reason == "stop":
            assert n >= kw["min_tokens"], (kw, out)  # no stop of any kind before min_tokens
        else:
            assert out.finish_reason == "length" and n == kw["max_tokens"], (kw, out)
        if isinstance(out.stop_reason, int):
            assert out.token_ids[-1] == out.stop_reason
            want = out.token_ids if kw["include_stop_str_in_output"] else out.token_ids[:-1]
            assert out.text == tok.decode(want), (kw, out)
        assert not out.text.endswith("\ufffd")
    check_clean(smol)
