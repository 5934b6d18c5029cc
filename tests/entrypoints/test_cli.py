"""The ``miniinfer`` command line: engine flags reach EngineConfig; generate and chat run."""
from __future__ import annotations

import argparse
import io

import pytest

from miniinfer.entrypoints import cli


def _engine_args(argv: list[str]):
    p = argparse.ArgumentParser()
    cli.add_engine_args(p)
    return cli.engine_config_from_args(p.parse_args(argv))


def test_engine_flags_map_to_config():
    cfg = _engine_args(["--device", "cpu", "--no-overlap", "--no-prefix-caching", "--no-cpu-packed-weights",
                        "--no-cpu-gguf-kernels", "--attention-backend", "cpu", "--max-model-len", "512"])
    assert (cfg.overlap_scheduling, cfg.enable_prefix_caching, cfg.cpu_packed_weights, cfg.cpu_gguf_kernels) == (
        False, False, False, False)
    assert cfg.attention_backend == "cpu" and cfg.max_model_len == 512
    defaults = _engine_args(["--device", "cpu"])
    assert defaults.overlap_scheduling and defaults.cpu_packed_weights and defaults.cpu_gguf_kernels


def test_generate_streams_the_answer(capsys):
    rc = cli.main(["generate", "What is the capital of France?", "--device", "cpu", "--temperature", "0",
                   "--max-tokens", "12", "--max-model-len", "512"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_reads_turns_until_an_empty_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\n"))
    rc = cli.main(["chat", "--device", "cpu", "--temperature", "0", "--max-tokens", "12", "--max-model-len", "512"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_bad_input_is_an_error_line_not_a_traceback(capsys):
    rc = cli.main(["generate", "hi", "--device", "cpu", "--temperature", "-1", "--max-model-len", "512"])
    assert rc == 2
    assert "temperature" in capsys.readouterr().err
