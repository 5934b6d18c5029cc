"""Session-wide fixtures: tiny random HF models (built once, saved with ``save_pretrained``),
the embedded SmolLM2 engine and its transformers reference (each loaded once: ~17 s apiece)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test folder

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(name) -> (folder, hf_model)`` for a name in ``helpers.TINY_SPECS``;
    each model is built and saved once per session."""
    cache: dict[str, tuple[str, object]] = {}

    def get(name: str):
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(f"tiny_{name}"))
            cache[name] = (folder, helpers.make_tiny_model(name, folder))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    """``tiny_llm(name, **engine_kwargs) -> LLM`` over a tiny model (fp32, CPU). Engines are
    cheap to build (milliseconds), so each call makes a fresh one."""
    from miniinfer import LLM

    def make(name: str = "llama", **kwargs):
        folder, _ = tiny_model(name)
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("num_kv_blocks", 128)
        return LLM(folder, progress=False, **kwargs)

    return make


@pytest.fixture(scope="session")
def llama_llm(tiny_llm):
    """One shared engine over the tiny Llama (default settings); tests must leave it idle."""
    return tiny_llm("llama")


@pytest.fixture(scope="session")
def smol_llm():
    from miniinfer import LLM
    return LLM(None, dtype="float32", max_model_len=2048, progress=False)


@pytest.fixture(scope="session")
def smol_hf():
    return helpers.load_hf_smollm2()


@pytest.fixture
def smol(smol_llm):
    """The shared SmolLM2 engine, checked to be left clean by the test."""
    yield smol_llm
    eng = smol_llm.engine
    assert not eng.has_unfinished_requests()
    eng.check_integrity()
