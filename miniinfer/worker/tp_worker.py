"""Starting and stopping the tensor-parallel worker processes (ranks 1..N-1).

Each worker builds its shard of the model and KV cache, then runs :func:`serve`: every
forward rank 0 broadcasts (a :class:`StepHeader` and the packed input buffer of
``worker/input_batch.py``), until rank 0 broadcasts STOP. A worker whose parent dies
exits at once (watchdog thread), so no rank outlives the engine; a rank that dies makes the
others' next collective fail with an error instead of hanging.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time

import torch

from miniinfer.attention.metadata import forward_context
from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.loader.model_loader import ModelSource
from miniinfer.parallel import TPGroup, init_tp
from miniinfer.worker.input_batch import STOP, StepHeader, unpack_inputs

HEADER_LEN = len(StepHeader._fields)


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
                 source: ModelSource, max_model_len: int, parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    from miniinfer.worker.model_runner import ModelRunner
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = init_tp(rank, size, init_method, cfg.device)
    runner = ModelRunner(cfg, model_config, source, max_model_len, progress=False, tp=tp)
    try:
        serve(runner)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def start_workers(cfg: EngineConfig, model_config: ModelConfig, source: ModelSource,
                  max_model_len: int) -> tuple[TPGroup, list[mp.Process]]:
    """Spawn ranks 1..N-1 and join the group as rank 0."""
    size = cfg.tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    # fork (like vLLM) on CPU; spawn on CUDA, which a forked child can't initialize again
    # (spawn needs the caller's script to be import-safe: `if __name__ == "__main__":`).
    ctx = mp.get_context("spawn" if cfg.device.startswith("cuda") or torch.cuda.is_initialized() else "fork")
    procs = []
    for rank in range(1, size):
        p = ctx.Process(target=_worker_main, daemon=True, name=f"miniinfer-tp{rank}",
                        args=(rank, size, init_method, cfg, model_config, source, max_model_len, os.getpid()))
        p.start()
        procs.append(p)
    return init_tp(0, size, init_method, cfg.device), procs


def broadcast_step(tp: TPGroup, header: StepHeader, buf: torch.Tensor) -> None:
    """Rank 0: send one step's inputs to the other ranks."""
    tp.broadcast(torch.tensor(header, dtype=torch.int64).to(buf.device))
    tp.broadcast(buf)


def serve(runner) -> None:
    """Ranks > 0: run every forward rank 0 broadcasts, until it broadcasts STOP."""
    header_t = torch.empty(HEADER_LEN, dtype=torch.int64, device=runner.device)
    with torch.inference_mode():
        while True:
            runner.tp.broadcast(header_t)
            header = StepHeader(*header_t.tolist())
            if header.kind == STOP:
                return
            buf = torch.empty(header.buffer_len, dtype=torch.int64, device=runner.device)
            runner.tp.broadcast(buf)
            batch = unpack_inputs(buf, header)
            with forward_context(batch.attn_metadata):
                hidden = runner.model(batch.input_ids, batch.positions)
            if header.num_logits:
                runner.model.compute_logits(hidden[batch.logits_indices])


def stop_workers(runner, procs: list[mp.Process]) -> None:
    import torch.distributed as dist
    try:
        if all(p.is_alive() for p in procs):
            stop = StepHeader(STOP, *([0] * (HEADER_LEN - 1)))
            runner.tp.broadcast(torch.tensor(stop, dtype=torch.int64).to(runner.device))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
