"""The decoder's tensor-parallel all-reduces go through ``TPGroup.all_reduce_add_rms_norm`` (the
all-reduce fused with the residual add + RMSNorm that follows it; one kernel on CUDA with
``MINIINFER_FUSED_AR_NORM=1``, all-reduce + add + norm on gloo). CPU: greedy outputs with the
switch on equal one rank's at 2 and 3 ranks, every forward makes an even number of these
calls and no bare all-reduce, and the gloo path matches the torch reference of the fused math."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers import dummy_decoder_folder, random_prompts
from miniinfer import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.mark.parametrize("family,heads,kv_heads,tp", [("qwen2", 6, 6, 2), ("qwen3", 6, 3, 3), ("llama", 6, 1, 3)])
def test_tp_with_switch_on_equals_one_rank(tmp_path, monkeypatch, family, heads, kv_heads, tp):
    from miniinfer import LLM
    monkeypatch.setenv("MINIINFER_FUSED_AR_NORM", "1")  # the spawned ranks inherit it
    folder = dummy_decoder_folder(tmp_path, family, heads, kv_heads, layers=3)
    kw = dict(load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64, progress=False)
    prompts = random_prompts(4, seed=11, min_len=3, max_len=30, vocab=600)
    run = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]  # noqa: E731
    want = run(LLM(folder, **kw))
    assert len({tuple(w) for w in want}) > 1  # not a degenerate model
    llm = LLM(folder, tensor_parallel_size=tp, **kw)
    try:
        assert run(llm) == want
    finally:
        llm.engine.shutdown()


class _CountingTP:
    """Stands in for a 2-rank TPGroup on one process: all-reduces are the identity, counted."""

    def __init__(self):
        from miniinfer.parallel import TPGroup
        self.inner = TPGroup(rank=0, size=2)
        self.calls = {"all_reduce": 0, "all_reduce_add_rms_norm": 0}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def all_reduce(self, x):
        self.calls["all_reduce"] += 1
        return x

    def all_reduce_add_rms_norm(self, x, residual, weight, eps):
        from miniinfer.models import ops
        self.calls["all_reduce_add_rms_norm"] += 1
        return ops.fused_add_rms_norm(x, residual, weight, eps)

    def all_gather_last_dim(self, x):
        return x


def test_every_all_reduce_is_fused_with_a_norm(tmp_path, monkeypatch):
    """2 per layer (post-attention norm; next input norm or the final norm), none bare: the even
    count ``comm.py``'s ping-pong buffers rely on."""
    import miniinfer.models.decoder as dec
    from miniinfer.config import ModelConfig
    dummy_decoder_folder(tmp_path, "qwen2", 6, 6, layers=3)
    cfg = ModelConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))

    class _NoAttention:  # attention itself is not what is counted: q's shape back
        name = "torch"

        def forward(self, q, k, v, *args):
            return q.clone()

    monkeypatch.setattr(dec, "get_attention_metadata", lambda: None)
    tp = _CountingTP()
    model = dec.DecoderForCausalLM(cfg, _NoAttention(), 64, tp=tp)
    model.cpu_decode = False
    model(torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2]))
    assert tp.calls == {"all_reduce": 0, "all_reduce_add_rms_norm": 2 * cfg.num_layers}


def test_switch_is_on_by_default(monkeypatch):
    from miniinfer.comm import FUSED_AR_NORM_ENV, fused_ar_norm_requested
    monkeypatch.delenv(FUSED_AR_NORM_ENV, raising=False)
    assert fused_ar_norm_requested()
    monkeypatch.setenv(FUSED_AR_NORM_ENV, "0")
    assert not fused_ar_norm_requested()
    monkeypatch.setenv(FUSED_AR_NORM_ENV, "1")
    assert fused_ar_norm_requested()


def _gloo_rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from miniinfer.kernels.allreduce_norm import allreduce_add_rms_norm_ref
    from miniinfer.parallel import TPGroup
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(4)
        parts = [torch.randn(7, 40, generator=g) for _ in range(world)]
        res, w = torch.randn(7, 40, generator=g), torch.randn(40, generator=g)
        want = allreduce_add_rms_norm_ref(parts, res, w, 1e-6)
        normed, new_res = TPGroup(rank, world).all_reduce_add_rms_norm(parts[rank].clone(), res.clone(), w, 1e-6)
        queue.put((rank, (normed - want[0]).abs().max().item(), (new_res - want[1]).abs().max().item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_all_reduce_add_rms_norm_matches_reference(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert len(got) == world and all(dx < 1e-5 and dr < 1e-5 for _, dx, dr in got), got
