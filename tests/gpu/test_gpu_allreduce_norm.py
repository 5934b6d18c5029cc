"""2 GPUs: the fused one-shot all-reduce + residual add + RMSNorm kernel
(``kernels/allreduce_norm.py`` through ``CudaCommunicator.all_reduce_add_rms_norm``) against
all-reduce + ``fused_add_rms_norm`` and the torch reference, bit-identical on both ranks, eager
and inside a CUDA graph replayed 100 times with new inputs each time; then TP=2 greedy with
``MINIINFER_FUSED_AR_NORM=1`` equals TP=1 (fp32, dummy weights, CUDA graphs on)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

HIDDEN, EPS = 3584, 1e-6


def _inputs(rows: int, world: int, seed: int, dev) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every rank's partial, the residual and the weight (the same on every rank: one seed)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    parts = [torch.randn(rows, HIDDEN, generator=g, device=dev).bfloat16() for _ in range(world)]
    res = torch.randn(rows, HIDDEN, generator=g, device=dev).bfloat16() * 4
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g, device=dev)).bfloat16()
    return parts, res, w


def _check(normed, res, parts, residual, w, group) -> None:
    """Close to the reference and to the unfused math; equal on every rank."""
    import torch.distributed as dist
    from miniinfer.kernels.allreduce_norm import allreduce_add_rms_norm_ref
    from miniinfer.kernels.norm import fused_add_rms_norm_ref
    want_n, want_r = allreduce_add_rms_norm_ref(parts, residual, w, EPS)
    assert torch.equal(res, want_r), (res.float() - want_r.float()).abs().max()
    torch.testing.assert_close(normed.float(), want_n.float(), atol=3e-2, rtol=2e-2)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    un_n, un_r = fused_add_rms_norm_ref(total, residual, w, EPS)
    torch.testing.assert_close(normed.float(), un_n.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(res.float(), un_r.float(), atol=3e-2, rtol=2e-2)
    both = [torch.empty_like(normed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(both, normed.contiguous(), group=group)
    assert all(torch.equal(b, both[0]) for b in both), "ranks disagree"


def _rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from miniinfer.comm import CudaCommunicator
    from miniinfer.parallel import TP_ENV
    import os
    os.environ.update(TP_ENV)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, device_id=dev)
    try:
        dist.all_reduce(torch.ones(1, device=dev))
        comm = CudaCommunicator(dist.group.WORLD, dev, torch.bfloat16, mode="symm_mem", fused_norm=True)
        assert comm.fused_norm, "the fused kernel did not set up"
        for rows in (1, 8, 33, 64, 200, 256):  # eager
            parts, residual, w = _inputs(rows, world, rows, dev)
            normed, res = comm.all_reduce_add_rms_norm(parts[rank].clone(), residual.clone(), w, EPS)
            _check(normed, res, parts, residual, w, dist.group.WORLD)
        _graph_replays(comm, rank, world, dev)
        queue.put((rank, "ok"))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        import traceback
        queue.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
    finally:
        dist.destroy_process_group()


def _graph_replays(comm, rank: int, world: int, dev) -> None:
    """Two fused ops per graph (the even count), 100 replays with new inputs before each."""
    import torch.distributed as dist
    rows = 8
    static = [_inputs(rows, world, 0, dev) for _ in range(2)]
    srcs = [(s[0][rank].clone(), s[1].clone()) for s in static]  # graph inputs, refilled per replay
    work = [(torch.empty_like(x), torch.empty_like(r)) for x, r in srcs]
    outs = []

    def body():
        outs.clear()
        for (x0, r0), (x, r), s in zip(srcs, work, static):
            x.copy_(x0)
            r.copy_(r0)
            outs.append(comm.all_reduce_add_rms_norm(x, r, s[2], EPS))
    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for step in range(100):
        fresh = [_inputs(rows, world, 1000 + 2 * step + i, dev) for i in range(2)]
        for (x0, r0), f in zip(srcs, fresh):
            x0.copy_(f[0][rank])
            r0.copy_(f[1])
        g.replay()
        torch.cuda.synchronize()
        for (normed, res), f, s in zip(outs, fresh, static):
            _check(normed, res, f[0], f[1], s[2], dist.group.WORLD)


def test_fused_kernel_eager_and_graph_replays():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == {0: "ok", 1: "ok"}, got


def test_tp2_greedy_equals_tp1_with_fused_norm(monkeypatch):
    from miniinfer import LLM, SamplingParams
    import random
    kw = dict(load_format="dummy", dtype="float32", max_model_len=1024, gpu_memory_utilization=0.2, progress=False,
              max_num_seqs=32)
    rng = random.Random(5)
    prompts = [[rng.randrange(0, 10000) for _ in range(n)] for n in (5, 40, 130, 17, 64)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    run = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]  # noqa: E731
    llm = LLM("qwen2-0.5b", **kw)
    want = run(llm)
    del llm
    torch.cuda.empty_cache()
    monkeypatch.setenv("MINIINFER_FUSED_AR_NORM", "1")  # read by each rank's CudaCommunicator
    llm = LLM("qwen2-0.5b", tensor_parallel_size=2, all_reduce_mode="symm_mem", **kw)
    try:
        assert llm.engine.runner.tp.comm.fused_norm
        assert llm.engine.runner.cuda_graphs is not None
        assert run(llm) == want
    finally:
        llm.engine.shutdown()
