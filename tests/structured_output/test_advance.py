"""The grammar thread's step work (``structured_output/advance.py``): matchers advanced by the
committed tokens and the next step's rows filled off the engine thread, beside the output
processing, with the same outcome as doing it in ``OutputProcessor.process``."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import jsonschema
import torch

from helpers import check_clean
from miniinfer import SamplingParams, StructuredOutputsParams
from schemas import SCHEMAS


def _allowed(so, matcher) -> list[int]:
    import xgrammar as xgr
    row = torch.empty((1, xgr.get_bitmask_shape(1, so.info.vocab_size)[1]), dtype=torch.int32)
    matcher.fill_next_token_bitmask(row, 0)
    return [w * 32 + b for w, x in enumerate(row[0].tolist()) if x for b in range(32) if (x >> b) & 1]


def _seq(matcher):
    return SimpleNamespace(grammar=matcher, grammar_active=True, is_finished=False)


def test_advance_accepts_fills_and_flags_rejected_and_terminated(smol):
    """Each matcher accepts its token on the grammar thread; the next rows equal a fill done
    afterwards one by one; a rejected token and a completed grammar are reported, and their
    rows allow everything (never an all -inf row); the GIL switch interval is restored."""
    so = smol.engine.structured_output
    tok = smol.engine.tokenizer
    choice = so.compile(StructuredOutputsParams(choice=["yes", "no"]))
    schema = so.compile(StructuredOutputsParams(json=SCHEMAS[0]))
    yes = tok.encode("yes", add_special_tokens=False)
    assert len(yes) == 1  # one token completes the choice, then only a stop token may follow
    m_done, m_bad, m_ok, m_fresh = (so.new_matcher(g) for g in (choice, choice, schema, schema))
    assert m_done.accept_token(yes[0])
    eos = so.info.stop_token_ids[0]
    ok_token = _allowed(so, m_ok)[0]
    bad_token = next(t for t in range(so.info.vocab_size) if t not in set(_allowed(so, m_bad)))
    seqs = [_seq(m) for m in (m_done, m_bad, m_ok, m_fresh)]
    switch = sys.getswitchinterval()
    advance = so.start_advance([(seqs[0], eos), (seqs[1], bad_token), (seqs[2], ok_token)], seqs)
    assert advance is not None and advance.covers(seqs[2]) and not advance.covers(seqs[3])
    outcome = advance.wait()
    assert sys.getswitchinterval() == switch
    assert [(a, t) for _, _, a, t in outcome] == [(True, True), (False, False), (True, False)]
    mask = so.fill_bitmask(seqs)
    assert mask.rows == [0, 1, 2, 3]
    host = mask.bitmask
    assert bool((host[0] == -1).all()) and bool((host[1] == -1).all())
    want = torch.zeros_like(host[:2])
    m_ok.fill_next_token_bitmask(want, 0)
    m_fresh.fill_next_token_bitmask(want, 1)
    assert torch.equal(host[2:4], want)


def test_advance_is_off_in_the_serial_baseline(smol):
    so = smol.engine.structured_output
    m = so.new_matcher(so.compile(StructuredOutputsParams(choice=["yes", "no"])))
    so.overlap = False
    try:
        assert so.start_advance([], [_seq(m)]) is None
    finally:
        so.overlap = True


def test_constrained_batch_takes_the_grammar_thread_and_matches_alone(smol):
    """Overlap scheduling with several constrained requests (JSON and a choice that completes
    after one token) and a plain one: the steps go through the grammar thread, and each greedy
    output equals the request run alone."""
    eng = smol.engine
    so = eng.structured_output
    started = []
    start = so.start_advance
    so.start_advance = lambda *a: (lambda r: (started.append(r is not None), r)[1])(start(*a))
    prompts = [eng.apply_chat_template([{"role": "user", "content": c}]) for c in (
        "Describe a city as JSON: " + json.dumps(SCHEMAS[0]), "Is the sky blue? Answer yes or no.",
        "Describe a book as JSON: " + json.dumps(SCHEMAS[1]), "Count from 1 to 20.")]
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMAS[0])),
              SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
              SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMAS[1])),
              SamplingParams(temperature=0, max_tokens=60)]
    try:
        together = smol.generate(prompts, params, use_tqdm=False)
    finally:
        del so.start_advance
    assert sum(started) >= 10, started
    alone = [smol.generate(p, sp, use_tqdm=False)[0].outputs[0] for p, sp in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in together] == [a.token_ids for a in alone]
    choice = together[1].outputs[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    for i in (0, 2):
        out = together[i].outputs[0]
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), params[i].structured_outputs.json)
    check_clean(smol)
