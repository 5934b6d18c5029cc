"""All-reduce microbenchmark (shared/BENCHMARKS.md §13): NCCL against the one-shot and two-shot
all-reduces over symmetric (peer-mapped) memory of ``miniinfer/comm.py`` (each forced at every
size, and the engine's choice by size), inside CUDA graphs as the engine runs them, bf16,
8 KB - 32 MB, in place as the engine calls them. Needs >= 2 GPUs.

    python benchmarks/allreduce_bench.py --out results.json [--world-size 2] [--iters 20]
    python benchmarks/allreduce_bench.py --out fused.json --mode fused_norm

Reports, per message size, microseconds per all-reduce (a graph of ``--iters`` all-reduces
replayed ``--reps`` times, timed with CUDA events on rank 0) and checks every result.

``--mode fused_norm`` (``all``: both): the decode all-reduce followed by the residual add +
RMSNorm, T = 1, 8, 32, 64, 128, 256 rows of 3584 bf16, in CUDA graphs: one-shot all-reduce +
``fused_add_rms_norm`` (two kernels) against the single fused kernel
(``kernels/allreduce_norm.py``, ``CudaCommunicator.all_reduce_add_rms_norm``); microseconds per
all-reduce + norm, each result checked against the torch reference first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from miniinfer.parallel import TP_ENV  # noqa: E402

SIZES = [8 << 10 << i for i in range(13)]  # 8 KB .. 32 MB
NORM_ROWS = (1, 8, 32, 64, 128, 256)
NORM_HIDDEN = 3584  # Qwen2-7B


def _graph_time(fn, iters: int, reps: int) -> float:
    """Microseconds per call of ``fn`` captured ``iters`` times in one graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (iters * reps)


def _eager_time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(TP_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    out: dict = {"ops": sorted(n for n in ("one_shot_all_reduce", "one_shot_all_reduce_out",
                                           "one_shot_all_reduce_copy", "two_shot_all_reduce_",
                                           "multimem_all_reduce_") if hasattr(torch.ops.symm_mem, n)),
                 "us": {}, "errors": {}, "engine_methods": {}}
    if args.mode in ("sizes", "all"):
        _sizes(rank, world, args, out)
    if args.mode in ("fused_norm", "all"):
        _fused_norm(rank, world, args, out)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def _sizes(rank: int, world: int, args, out: dict) -> None:
    """NCCL / one-shot / two-shot / the engine's choice at every size of ``SIZES``."""
    from miniinfer.comm import CudaCommunicator
    dev, dt = torch.device("cuda", rank), torch.bfloat16
    group = dist.group.WORLD
    results: dict[str, dict[int, float]] = {"nccl_eager": {}, "nccl_graph": {}, "one_shot_graph": {},
                                            "two_shot_graph": {}, "engine_graph": {}}
    errors: dict[str, str] = {}
    comms = {}
    top = max(SIZES)
    for name, kw in (("one_shot_graph", dict(one_shot_max_bytes=top, two_shot_max_bytes=top)),
                     ("two_shot_graph", dict(one_shot_max_bytes=0, two_shot_max_bytes=top)),
                     ("engine_graph", {})):  # the engine's defaults: one-shot, two-shot, NCCL by size
        try:
            comms[name] = CudaCommunicator(group, dev, dt, mode="symm_mem", **kw)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    out["engine_methods"] = {}
    dist.all_reduce(torch.ones(1, device=dev))
    for size in SIZES:
        n = size // 2
        x = torch.full((n,), float(rank + 1), dtype=dt, device=dev)
        want = float(world * (world + 1) // 2)

        def nccl(x=x):  # in place, as the engine calls it
            dist.all_reduce(x)
            return x
        cases = {"nccl_eager": None, "nccl_graph": nccl}
        for name, comm in comms.items():
            cases[name] = lambda x=x, comm=comm: comm.all_reduce(x)
        if "engine_graph" in comms:
            out["engine_methods"][size] = comms["engine_graph"].method(x)
        for name, fn in cases.items():
            try:
                if name == "nccl_eager":
                    us = _eager_time(lambda: dist.all_reduce(x), args.iters * args.reps)
                    results[name][size] = us
                    continue
                x.fill_(float(rank + 1))
                y = fn()
                torch.cuda.synchronize()
                if not torch.all(y == want):
                    raise RuntimeError(f"wrong sum: {y[:4].tolist()} != {want}")
                x.fill_(0.0)  # timed runs in place: keep the values finite
                results[name][size] = _graph_time(fn, args.iters, args.reps)
            except Exception as e:  # noqa: BLE001
                errors.setdefault(name, f"{size}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")
    out["us"].update(results)
    out["errors"].update(errors)


def _fused_norm(rank: int, world: int, args, out: dict) -> None:
    """One-shot all-reduce + fused_add_rms_norm against the fused kernel, ``NORM_ROWS`` rows."""
    from miniinfer.comm import CudaCommunicator
    from miniinfer.kernels.allreduce_norm import allreduce_add_rms_norm_ref
    dev, dt, eps = torch.device("cuda", rank), torch.bfloat16, 1e-6
    big = max(NORM_ROWS) * NORM_HIDDEN * 2  # every T one-shot in the unfused baseline
    results: dict[str, dict[int, float]] = {"arnorm_unfused_graph": {}, "arnorm_fused_graph": {}}
    dist.all_reduce(torch.ones(1, device=dev))  # NCCL's communicator before any capture
    comms = {}
    for name, fused in (("arnorm_unfused_graph", False), ("arnorm_fused_graph", True)):
        try:
            comms[name] = CudaCommunicator(dist.group.WORLD, dev, dt, mode="symm_mem", one_shot_max_bytes=big,
                                           fused_norm=fused)
            if fused and not comms[name].fused_norm:
                raise RuntimeError("the fused kernel did not set up (see the log)")
        except Exception as e:  # noqa: BLE001
            out["errors"][name] = f"{type(e).__name__}: {e}"
            comms.pop(name, None)
    iters = args.iters + args.iters % 2  # an even count per graph: the ping-pong buffers (comm.py)
    for rows in NORM_ROWS:
        g = torch.Generator(device=dev).manual_seed(rows)
        parts = [torch.randn(rows, NORM_HIDDEN, generator=g, device=dev).to(dt) for _ in range(world)]
        res0 = torch.randn(rows, NORM_HIDDEN, generator=g, device=dev).to(dt)
        w = torch.ones(NORM_HIDDEN, dtype=dt, device=dev)
        want_n, want_r = allreduce_add_rms_norm_ref(parts, res0, w, eps)
        for name, comm in comms.items():
            try:
                x, res = parts[rank].clone(), res0.clone()
                normed, res = comm.all_reduce_add_rms_norm(x, res, w, eps)
                torch.cuda.synchronize()
                err = max((normed.float() - want_n.float()).abs().max(), (res.float() - want_r.float()).abs().max())
                if err > 5e-2:
                    raise RuntimeError("wrong result against the torch reference")
                results[name][rows] = _graph_time(lambda c=comm, x=x, r=res: c.all_reduce_add_rms_norm(x, r, w, eps),
                                                  iters, args.reps)
            except Exception as e:  # noqa: BLE001
                out["errors"].setdefault(name, f"{rows}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")
    out["us"].update(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mode", choices=("sizes", "fused_norm", "all"), default="sizes")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, port, args, queue)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    res = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    metrics = {}
    for name, per in res["us"].items():
        for key, us in per.items():
            label = f"{key}rows" if name.startswith("arnorm") else f"{key // 1024}kb"
            metrics[f"allreduce_{name}_{label}_us"] = round(us, 2)
    us = res["us"]
    for size in SIZES:
        a, b = us.get("nccl_graph", {}).get(size), us.get("engine_graph", {}).get(size)
        if a and b:
            metrics[f"allreduce_engine_speedup_vs_nccl_{size // 1024}kb"] = round(a / b, 3)
    for rows in NORM_ROWS:
        a, b = us.get("arnorm_unfused_graph", {}).get(rows), us.get("arnorm_fused_graph", {}).get(rows)
        if a and b:
            metrics[f"allreduce_arnorm_fused_speedup_{rows}rows"] = round(a / b, 3)
    doc = {"device": f"{args.world_size}x {torch.cuda.get_device_name(0)}",
           "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "metrics": metrics, "symm_mem_ops": res["ops"], "engine_methods": res["engine_methods"],
           "errors": res["errors"]}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
