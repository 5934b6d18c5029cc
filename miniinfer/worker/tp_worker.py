"""Starting and stopping the tensor-parallel worker processes (ranks 1..N-1).

Each worker builds its shard of the model and KV cache (running the same start-up as rank 0:
profile run, warm-up, CUDA-graph captures, so their collectives pair up), then runs
:func:`serve`: every step rank 0 publishes on the step channel, until it publishes STOP.

Processes are started with ``spawn`` (a forked child can't use CUDA once the parent
touched it, and a forked child of a threaded parent may deadlock), so the caller's script
must be import-safe (``if __name__ == "__main__":``) as with vLLM. A worker whose parent
dies exits at once (watchdog thread), so no rank outlives the engine; rank 0 checks the
workers while it waits on them and raises ``RuntimeError`` if one died.
"""
from __future__ import annotations

import dataclasses

import logging
import multiprocessing as mp
import os
import socket
import threading
import time

import torch

from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.loader.model_loader import ModelSource
from miniinfer.parallel import TPGroup, init_tp
from miniinfer.worker.input_batch import STOP, StepHeader
from miniinfer.worker.step_channel import (BroadcastStepChannel, ShmStepChannel, max_step_numel)

log = logging.getLogger("miniinfer")
HEADER_LEN = len(StepHeader._fields)
SHM_SLOTS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _worker_main(rank: int, size: int, init_method: str, cfg: EngineConfig, model_config: ModelConfig,
                 source: ModelSource, max_model_len: int, parent: int, shm: torch.Tensor | None,
                 slot_numel: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = init_tp(rank, size, init_method, cfg.device, cfg.torch_dtype, cfg.all_reduce_mode)
    channel = (ShmStepChannel(shm, size - 1, slot_numel, SHM_SLOTS, reader=rank) if shm is not None
               else BroadcastStepChannel(tp, torch.device(cfg.device)))
    run_worker(cfg, model_config, source, max_model_len, tp, channel)


def run_worker(cfg: EngineConfig, model_config: ModelConfig, source: ModelSource, max_model_len: int,
               tp: TPGroup, channel, leave: bool = True) -> None:
    """A rank > 0 from start to end: build the runner, serve, leave the group (``leave``)."""
    from miniinfer.worker.model_runner import ModelRunner
    runner = ModelRunner(cfg, model_config, source, max_model_len, progress=False, tp=tp)
    try:
        serve(runner, channel)
    except BaseException:
        leave_group(peers_alive=False)
        raise
    if cfg.device.startswith("cuda"):  # STOP: process exit tears down all there is (see leave_group)
        torch.cuda.synchronize()
        os._exit(0)
    if leave:
        leave_group()


def start_workers(cfg: EngineConfig, model_config: ModelConfig, source: ModelSource,
                  max_model_len: int) -> tuple[TPGroup, list[mp.Process], object]:
    """Spawn ranks 1..N-1 and join the group as rank 0. Returns (group, processes, channel)."""
    size = cfg.tensor_parallel_size
    cfg = _all_reduce_mode_for_this_process(cfg)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    slot_numel = max_step_numel(cfg.max_num_batched_tokens + cfg.max_num_seqs, cfg.max_num_seqs,
                                max_model_len, cfg.block_size)
    procs: list[mp.Process] = []
    channel = ShmStepChannel.create(size - 1, slot_numel, SHM_SLOTS, alive=lambda: all(p.is_alive() for p in procs))
    log.info("tensor parallelism: %d ranks, step channel %.1f MB of shared memory", size,
             channel.buffer.numel() * 8 / 1e6)
    ctx = mp.get_context("spawn")
    for rank in range(1, size):
        p = ctx.Process(target=_worker_main, daemon=True, name=f"miniinfer-tp{rank}",
                        args=(rank, size, init_method, cfg, model_config, source, max_model_len, os.getpid(),
                              channel.buffer, slot_numel))
        p.start()
        procs.append(p)
    return init_tp(0, size, init_method, cfg.device, cfg.torch_dtype, cfg.all_reduce_mode), procs, channel


def _all_reduce_mode_for_this_process(cfg: EngineConfig) -> EngineConfig:
    """NCCL for every rank when rank 0's process mapped symmetric memory for an earlier engine
    (see ``comm._SYMM_MEM_GROUPS``); the ranks must agree, so rank 0 decides before spawning.
    Raises ``RuntimeError`` if ``all_reduce_mode="symm_mem"`` was asked for explicitly."""
    from miniinfer.comm import symm_mem_used_in_process
    if cfg.all_reduce_mode == "nccl" or not cfg.device.startswith("cuda") or not symm_mem_used_in_process():
        return cfg
    if cfg.all_reduce_mode == "symm_mem":
        raise RuntimeError("all_reduce_mode='symm_mem': this process already mapped symmetric memory for an "
                           "earlier tensor-parallel engine; start the new engine in a new process")
    log.warning("tensor parallelism: symmetric memory was set up by an earlier engine in this process; "
                "this engine all-reduces with NCCL")
    return dataclasses.replace(cfg, all_reduce_mode="nccl")


def join_external(cfg: EngineConfig, model_config: ModelConfig, source: ModelSource,
                  max_model_len: int) -> tuple[TPGroup, object]:
    """``distributed_executor_backend="external_launcher"``: every rank is a process started by
    ``torchrun`` (any number of machines) running the same command. Joins the group from
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
    Rank 0 returns (group, channel) and goes on as the engine; every other rank serves rank 0
    here and then ends the process (exit status 0) when rank 0 shuts down.

    Raises ``ValueError`` if torchrun's world size differs from ``tensor_parallel_size``."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise ValueError("distributed_executor_backend=external_launcher needs torchrun's RANK / WORLD_SIZE "
                         "environment (start every rank with torchrun)")
    rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
    if size != cfg.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size ({cfg.tensor_parallel_size}) must equal torchrun's world size ({size})")
    single_host = int(env.get("LOCAL_WORLD_SIZE", size)) == size
    tp = init_tp(rank, size, "env://", cfg.device, cfg.torch_dtype, cfg.all_reduce_mode, single_host)
    channel = BroadcastStepChannel(tp, torch.device(cfg.device))
    if rank == 0:
        return tp, channel
    # under torchrun the process ends right after: no teardown racing rank 0's and the agents'
    run_worker(cfg, model_config, source, max_model_len, tp, channel, leave=False)
    logging.shutdown()
    os._exit(0)  # not SystemExit: the engine may have been built on a thread (a server's)


def serve(runner, channel) -> None:
    """Ranks > 0: run every step rank 0 publishes, until it publishes STOP."""
    with torch.inference_mode():
        while True:
            header, host = channel.receive()
            if header.kind == STOP:
                return
            runner.run_published(header, host)


def stop_workers(runner, procs: list[mp.Process]) -> None:
    """Publish STOP, join the workers (killing any that linger) and leave the group."""
    import torch.distributed as dist
    alive = all(p.is_alive() for p in procs)
    try:
        if alive and runner.channel is not None:
            runner.channel.publish(StepHeader(STOP, *([0] * (HEADER_LEN - 1))), [])
        # Graphs that captured NCCL kernels hold NCCL resources (graph buffer registration):
        # free them before the communicator goes (a suspect of the teardown hang seen on GPUs).
        runner.cuda_graphs = None
        if dist.is_initialized() and torch.cuda.is_available():
            import gc
            gc.collect()
            torch.cuda.synchronize()
        if dist.is_initialized() and procs:  # (torchrun's ranks: the group ends with the process)
            leave_group(alive)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def leave_group(peers_alive: bool = True) -> None:
    """Leave the process group at shutdown. gloo: the orderly teardown. NCCL: an abort once
    this rank's work is done — its orderly teardown is collective and was seen to hang on
    2x H200 with CUDA graphs holding NCCL kernels; after STOP nothing is pending anyway."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        if peers_alive:
            torch.cuda.synchronize()
        # Seen to hang on 2x H200 (destroy and abort alike, with symmetric memory mapped and
        # graphs holding NCCL kernels): never let it hang the caller.
        t = threading.Thread(target=_abort_group, daemon=True, name="miniinfer-tp-teardown")
        t.start()
        t.join(timeout=10)
        if t.is_alive():
            log.warning("tensor parallelism: the NCCL group did not tear down within 10 s; "
                        "a new tensor-parallel engine needs a new process")
    elif peers_alive:
        dist.destroy_process_group()
    else:
        _abort_group()


def kill_workers(procs: list[mp.Process]) -> None:
    """Rank 0 failed during start-up: end the workers (which wait on its collectives) and
    leave the group without the orderly teardown."""
    import torch.distributed as dist
    for p in procs:
        p.kill()
        p.join(timeout=10)
    if dist.is_initialized():
        _abort_group()


def _abort_group() -> None:
    import torch.distributed as dist
    try:
        dist.distributed_c10d._abort_process_group()  # torch >= 2.6
    except Exception:  # noqa: BLE001 - best effort: the process is going on without the group
        log.warning("could not abort the tensor-parallel process group after a rank died")
