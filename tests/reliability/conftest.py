"""Fixtures of the reliability suite: real-engine servers (embedded SmolLM2-135M on CPU) in
subprocesses, one per test module, see rel_harness.py."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rel_harness import Probe, engine_importable  # noqa: E402


@pytest.fixture(scope="module")
def make_server():
    """``make_server(**engine_config_overrides) -> Probe``; closed at the end of the module."""
    err = engine_importable()
    if err is not None:
        pytest.skip(f"miniinfer.engine.llm_engine.LLMEngine is not importable: {err}")
    started: list[Probe] = []

    def make(**overrides) -> Probe:
        p = Probe(**overrides)
        started.append(p)
        return p

    yield make
    for p in started:
        p.close()
