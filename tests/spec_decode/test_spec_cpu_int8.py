"""Speculative decoding on the embedded SmolLM2 with ``cpu_int8_activations`` (int8 activations on
every Q4_1 call, batch-1 decode included): greedy output with n-gram and EAGLE drafts is the
output without speculation, token for token. A verify's rows run the same int8 GEMMs as the
decode steps they stand for, and an int8 row's bits don't depend on how many rows share its call
(tests/kernels/test_cpu_kernels.py)."""
from __future__ import annotations

import pytest

from miniinfer import LLM
from miniinfer.kernels import cpu_kernels
from test_spec_engine import EAGLE, GREEDY, NGRAM, PROMPTS, _chat, _ids

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build (no gcc/cc?)")


def _int8_llm(spec=None) -> LLM:
    return LLM(None, dtype="float32", max_model_len=2048, progress=False, cpu_int8_activations=True,
               speculative_config=spec)


@pytest.fixture(scope="module")
def int8_reference():
    """Batch-1 greedy ids of every prompt without speculation, and the fp32 model's."""
    llm = _int8_llm()
    prompts = _chat(llm)
    int8 = [_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    from miniinfer.models.packed_linear import use_int8_activations
    use_int8_activations(llm.engine.runner.model, None)
    fp32 = [_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    return int8, fp32


@pytest.mark.parametrize("spec", [NGRAM, EAGLE], ids=["ngram", "eagle"])
def test_int8_greedy_identical_with_and_without_speculation(spec, int8_reference):
    from miniinfer.models.cpu_decode import CPUDecodePlan
    from miniinfer.models.packed_linear import QuantizedLinear
    reference, fp32 = int8_reference
    if cpu_kernels.int8_kernel() is not None:  # else the portable path: int8 runs fp32
        assert reference != fp32, "int8 activations changed no token: are they on?"
    llm = _int8_llm(spec)
    model = llm.engine.runner.model
    assert {m.int8_min_rows for m in model.modules() if isinstance(m, QuantizedLinear) and m.fmt == "Q4_1"} == {1}
    prompts = _chat(llm)
    assert [_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts] == reference
    assert isinstance(model.cpu_decode, CPUDecodePlan)  # the steps ran in the one C call
    stats = llm.engine.stats()
    assert stats["spec_num_accepted_tokens"] > 0
    assert len(PROMPTS) == len(reference)
