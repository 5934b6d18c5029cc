"""Starting and stopping the tensor-parallel worker processes (ranks 1..N-1).

Each worker builds its shard of the model and KV cache, then runs ``ModelRunner.serve_worker``:
every forward rank 0 broadcasts, until rank 0 broadcasts STOP. A worker whose parent dies
exits at once (watchdog thread), so no rank outlives the engine; a rank that dies makes the
others' next collective fail with an error instead of hanging.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time

from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.loader.model_loader import ModelSource
from miniinfer.parallel import TP_ENV, TPGroup, init_tp


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
    import torch
    from miniinfer.engine.model_runner import ModelRunner
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = init_tp(rank, size, init_method, cfg.device)
    runner = ModelRunner(cfg, model_config, source, max_model_len, progress=False, tp=tp)
    try:
        runner.serve_worker()
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def start_workers(cfg: EngineConfig, model_config: ModelConfig, source: ModelSource,
                  max_model_len: int) -> tuple[TPGroup, list[mp.Process]]:
    """Spawn ranks 1..N-1 and join the group as rank 0."""
    size = cfg.tensor_parallel_size
    os.environ.update(TP_ENV)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    # fork (like vLLM) unless CUDA is already initialized here, which a forked child can't use;
    # spawn needs the caller's script to be import-safe (`if __name__ == "__main__":`).
    import torch
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    procs = []
    for rank in range(1, size):
        p = ctx.Process(target=_worker_main, daemon=True, name=f"miniinfer-tp{rank}",
                        args=(rank, size, init_method, cfg, model_config, source, max_model_len, os.getpid()))
        p.start()
        procs.append(p)
    return init_tp(0, size, init_method, cfg.device), procs


def stop_workers(runner, procs: list[mp.Process]) -> None:
    import torch.distributed as dist
    try:
        if all(p.is_alive() for p in procs):
            runner.stop_workers()
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
