"""Logits processors: each on fixed logits, their order, and logit_bias end to end."""
from __future__ import annotations

import pytest
import torch

from helpers import check_clean, random_prompts
from miniinfer import SamplingParams
from miniinfer.engine.sequence import Sequence
from miniinfer.sample.logits_processors import LOGITS_PROCESSORS
from miniinfer.sample.metadata import SamplingMetadata
from miniinfer.sample.sampler import sample


def _seq(tokens, n_prompt, **params):
    return Sequence("r", 0, list(tokens), n_prompt, SamplingParams(**params))


def _md(seqs, vocab, eos=()):
    return SamplingMetadata.build(seqs, vocab, torch.device("cpu"), eos)


def test_processors_run_only_when_a_row_needs_them():
    plain = _seq([0, 1], 2)
    assert _md([plain], 8).processors == []
    md = _md([plain, _seq([0, 1], 2, logit_bias={5: 2.0}, min_tokens=2, presence_penalty=0.5)], 8, eos=[3])
    assert [p.name for p, _ in md.processors] == ["logit_bias", "min_tokens", "penalties"]
    assert [p.name for p in LOGITS_PROCESSORS] == ["logit_bias", "min_tokens", "penalties"]


def test_logit_bias_adds_to_its_row_only():
    logits = torch.zeros(2, 6)
    md = _md([_seq([0], 1, logit_bias={2: 1.5, 4: -3.0}), _seq([0], 1)], 6)
    (proc, state), = md.processors
    out = proc.apply(logits, state)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, 1.5, 0.0, -3.0, 0.0]))
    torch.testing.assert_close(out[1], torch.zeros(6))


def test_min_tokens_ban_wins_over_a_bias():
    """The ban runs after the bias: a biased EOS still can't be sampled before min_tokens."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    s = _seq([0], 1, temperature=0, min_tokens=1, logit_bias={3: 100.0})
    assert int(sample(logits, _md([s], 4, eos=[3])).token_ids[0]) != 3


@pytest.mark.parametrize("bad", [{-1: 1.0}, {1: 101.0}, {"a": 1.0}, [1, 2]])
def test_logit_bias_validation_names_the_field(bad):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bad)


def test_logit_bias_steers_generation(llama_llm):
    prompt = random_prompts(1, seed=3, min_len=5, max_len=5)[0]
    greedy = llama_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    target = (greedy.outputs[0].token_ids[0] + 7) % 500
    biased = llama_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logit_bias={target: 100.0}),
                                use_tqdm=False)[0]
    assert biased.outputs[0].token_ids == [target] * 4
    with pytest.raises(ValueError, match="logit_bias"):
        llama_llm.generate([prompt], SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    check_clean(llama_llm)
