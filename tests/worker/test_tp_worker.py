"""Rank 0 decides the all-reduce mode for every rank before spawning them."""
import pytest

from miniinfer import comm
from miniinfer.config import EngineConfig
from miniinfer.worker.tp_worker import _all_reduce_mode_for_this_process


@pytest.fixture
def symm_mem_used(monkeypatch):
    monkeypatch.setattr(comm, "_SYMM_MEM_GROUPS", {"0"})


def test_fresh_process_keeps_the_mode():
    cfg = EngineConfig(device="cuda", all_reduce_mode="auto")
    assert comm.symm_mem_used_in_process() is False
    assert _all_reduce_mode_for_this_process(cfg) is cfg


def test_second_engine_in_a_process_falls_back_to_nccl(symm_mem_used):
    cfg = EngineConfig(device="cuda", all_reduce_mode="auto")
    assert _all_reduce_mode_for_this_process(cfg).all_reduce_mode == "nccl"
    assert cfg.all_reduce_mode == "auto"  # a copy: the caller's config is untouched


def test_explicit_symm_mem_in_a_used_process_raises(symm_mem_used):
    with pytest.raises(RuntimeError, match="new process"):
        _all_reduce_mode_for_this_process(EngineConfig(device="cuda", all_reduce_mode="symm_mem"))


def test_cpu_groups_are_unaffected(symm_mem_used):
    cfg = EngineConfig(device="cpu", all_reduce_mode="auto")
    assert _all_reduce_mode_for_this_process(cfg) is cfg
