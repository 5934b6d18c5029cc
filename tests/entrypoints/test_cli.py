"""The ``miniinfer`` command line: engine flags reach EngineConfig; generate and chat run."""
from __future__ import annotations

import argparse
import dataclasses
import io

import pytest

from miniinfer.config import EngineConfig
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


def test_defaults_are_engine_config_defaults():
    assert _engine_args(["--device", "cpu"]) == EngineConfig(device="cpu")


def test_every_engine_config_field_is_a_flag():
    p = argparse.ArgumentParser()
    cli.add_engine_args(p)
    dests = {a.dest for a in p._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= dests


def test_aliases_and_generated_names():
    cfg = _engine_args(["--device", "cpu", "--tp", "2", "--no-chunked-prefill", "--no-warmup",
                        "--enforce-eager", "--num-kv-blocks", "64", "--kv-cache-memory-gb", "0.5",
                        "--load-format", "dummy", "--tokenizer", "tok"])
    assert cfg.tensor_parallel_size == 2 and not cfg.enable_chunked_prefill and not cfg.warmup
    assert cfg.enforce_eager and cfg.num_kv_blocks == 64 and cfg.kv_cache_memory_gb == 0.5
    assert cfg.load_format == "dummy" and cfg.tokenizer == "tok"
    assert not _engine_args(["--device", "cpu", "--no-overlap-scheduling"]).overlap_scheduling
    assert _engine_args(["--device", "cpu", "--tensor-parallel-size", "3"]).tensor_parallel_size == 3


@pytest.mark.parametrize("argv", [["--overlap"], ["--attention-backend", "nope"], ["--max-num-seqs", "x"]])
def test_bad_engine_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        _engine_args(["--device", "cpu", *argv])


def test_a_new_config_field_becomes_a_flag(monkeypatch):
    """A field added to EngineConfig gets its flag with no edit to the CLI."""

    @dataclasses.dataclass
    class Extended(EngineConfig):
        new_budget: int = 7  # a new knob
        fast_path: bool = True
        verbose_steps: bool = False
        ratio: float | None = None
        names: list[str] = dataclasses.field(default_factory=list, metadata={"help": "some names"})

    monkeypatch.setattr(cli, "EngineConfig", Extended)
    p = argparse.ArgumentParser()
    cli.add_engine_args(p)
    helps = {a.dest: a.help for a in p._actions}
    assert helps["new_budget"].startswith("a new knob") and helps["names"].startswith("some names")
    cfg = cli.engine_config_from_args(p.parse_args(["--device", "cpu"]))
    assert isinstance(cfg, Extended)
    assert (cfg.new_budget, cfg.fast_path, cfg.verbose_steps, cfg.ratio, cfg.names) == (7, True, False, None, [])
    cfg = cli.engine_config_from_args(p.parse_args(
        ["--device", "cpu", "--new-budget", "9", "--no-fast-path", "--verbose-steps", "--ratio", "0.5",
         "--names", "a", "b"]))
    assert (cfg.new_budget, cfg.fast_path, cfg.verbose_steps, cfg.ratio, cfg.names) == (9, False, True, 0.5,
                                                                                        ["a", "b"])


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
