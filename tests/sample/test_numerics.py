"""Issue #11, kind 2: numerics of sampling parameters. Any accepted temperature behaves as the
limit it approaches; NaN / inf are refused naming the field; the sampler never makes NaN
probabilities out of finite logits."""
from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import check_clean, random_prompts
from miniinfer import SamplingParams
from miniinfer.engine.sequence import Sequence
from miniinfer.errors import InvalidRequestError
from miniinfer.sample.metadata import SamplingMetadata
from miniinfer.sample.sampler import sample, scaled_logits

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field) as ei:
        SamplingParams(**{field: value})
    assert ei.value.param == field


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_logit_bias_is_refused(value):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(logit_bias={5: value})
    assert ei.value.param == "logit_bias"


@pytest.mark.parametrize("seed", [2 ** 63, -(2 ** 63) - 1, 2 ** 64 - 1, 1.5, True])
def test_seed_range(seed):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(seed=seed)
    assert ei.value.param == "seed"


@pytest.mark.parametrize("t", [1e-40, 1e-20, 5e-6])
def test_tiny_temperature_is_greedy(llama_llm, t):
    prompts = random_prompts(3, seed=5, min_len=4, max_len=12)
    greedy = llama_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    tiny = llama_llm.generate(prompts, SamplingParams(temperature=t, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tiny] == [o.outputs[0].token_ids for o in greedy]
    check_clean(llama_llm)


def _random_params(rng: random.Random, vocab: int) -> dict:
    kw = dict(temperature=rng.choice([0.0, 1e-5, 1e-3, 0.7, 1.0, 5.0, 100.0]),
              top_p=rng.choice([1.0, 0.9, 1e-6]), top_k=rng.choice([-1, 1, 3, vocab]),
              min_p=rng.choice([0.0, 0.5, 1.0]), repetition_penalty=rng.choice([1.0, 1e-6, 1.5, 1e6]),
              presence_penalty=rng.choice([0.0, -2.0, 2.0]), frequency_penalty=rng.choice([0.0, -2.0, 2.0]),
              min_tokens=rng.choice([0, 5]))
    if rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(vocab): rng.choice([-100.0, 100.0])}
    if rng.random() < 0.3:
        kw["seed"] = rng.choice([0, 2 ** 63 - 1, -(2 ** 63)])
    return kw


def test_sampler_never_makes_nan_probabilities():
    """Random accepted parameters against extreme finite logits: the probabilities are finite
    and sum to 1 per row, and the sampled token is a real, allowed one."""
    rng = random.Random(0)
    vocab, eos = 12, 3
    f32max = torch.finfo(torch.float32).max
    extremes = [f32max, -f32max, 1e30, -1e30, 1e-30, 0.0, 88.0, -88.0]
    for trial in range(300):
        seqs, rows = [], []
        for _ in range(rng.randint(1, 4)):
            s = Sequence("r", 0, [1, 2, 4, 4], 2, SamplingParams(**_random_params(rng, vocab)))
            if s.params.seed is not None:
                s.generator = torch.Generator().manual_seed(s.params.seed % 2 ** 64)
            seqs.append(s)
            rows.append([rng.choice(extremes) if rng.random() < 0.6 else rng.uniform(-50, 50) for _ in range(vocab)])
        logits = torch.tensor(rows, dtype=torch.float32)
        assert torch.isfinite(logits).all()
        md = SamplingMetadata.build(seqs, vocab, torch.device("cpu"), [eos])
        processed = logits
        for proc, state in md.processors:
            processed = proc.apply(processed, state)
        processed = processed.clamp(max=f32max)
        probs = scaled_logits(processed, md).softmax(-1)
        assert not torch.isnan(probs).any(), (trial, [s.params for s in seqs])
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(seqs)))
        ids = sample(logits.clone(), md, torch.Generator().manual_seed(trial)).token_ids.tolist()
        for s, tok in zip(seqs, ids):
            assert 0 <= tok < vocab
            if s.params.min_tokens and not s.params.ignore_eos:
                assert tok != eos, (trial, s.params)
