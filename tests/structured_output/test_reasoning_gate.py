"""A reasoning model's grammar sleeps until the thinking ended (issue #12): the tokens before
the end marker are the unconstrained model's, the rest follows the grammar. SmolLM2 has no
``<think>`` tokens, so the test registers a parser whose end marker is a token the model writes
early (a full stop)."""
from __future__ import annotations

import re

import pytest

from miniinfer import SamplingParams, StructuredOutputsParams
from miniinfer import reasoning
from miniinfer.reasoning import reasoning_ended, reasoning_markers

REGEX = r" ?[0-9]{3}-[0-9]{2}"


@pytest.fixture
def dot_parser(smol, monkeypatch):
    monkeypatch.setitem(reasoning.REASONING_MARKERS, "dot", ("Thinking:", "."))
    monkeypatch.setattr(smol.engine.config, "reasoning_parser", "dot")
    return smol


def test_markers_and_prompt_check():
    assert reasoning_markers("qwen3") == ("<think>", "</think>")
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        reasoning_markers("nope")
    s, e = [7], [8, 9]
    assert reasoning_ended([1, 7, 2, 8, 9, 3], s, e)  # closed in the prompt (thinking disabled)
    assert not reasoning_ended([1, 7, 2], s, e)  # open: the model thinks first
    assert not reasoning_ended([8, 9, 7, 2], s, e)  # an earlier turn's end doesn't count
    assert not reasoning_ended([2, 8, 9], s, e)  # no start marker: thinking is expected
    assert not reasoning_ended([1, 2], s, e)


def test_grammar_starts_after_the_end_marker(dot_parser):
    llm = dot_parser
    prompt = llm.engine.apply_chat_template([{"role": "user", "content": "Describe the moon in two sentences."}])
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0].text
    assert "." in free  # the fixture's premise: greedy SmolLM2 ends a sentence early
    head = free[:free.index(".") + 1]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64,
                                              structured_outputs=StructuredOutputsParams(regex=REGEX)),
                       use_tqdm=False)[0].outputs[0]
    assert out.text.startswith(head), (head, out.text)  # thinking: unconstrained, identical
    assert re.fullmatch(REGEX, out.text[len(head):]), out.text  # after the marker: the grammar
    assert out.finish_reason == "stop"


def test_prompt_that_closed_the_thinking_is_constrained_at_once(dot_parser):
    llm = dot_parser
    prompt = llm.engine.apply_chat_template([{"role": "user", "content": "Give a code."}]) + "Thinking: none."
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32,
                                              structured_outputs=StructuredOutputsParams(regex=REGEX)),
                       use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(REGEX, out.text), out.text
