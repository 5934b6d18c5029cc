"""CPU decode steps in one C call (models/cpu_decode.py): the same tokens and log-probabilities
as the per-module path, on every kernel path this CPU runs, for Llama (the embedded GGUF),
Qwen2 (q/k/v bias) and Qwen3 (q/k norms) layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import random_prompts
from miniinfer import SamplingParams
from miniinfer.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build (no gcc/cc?)")
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)


def _run(llm, prompts, fused: bool):
    llm.engine.runner.model.cpu_decode = None if fused else False
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert lx.keys() == ly.keys()
            for t in lx:
                assert abs(lx[t].logprob - ly[t].logprob) < 1e-4


def _quantize_projections(model, fmt: str, seed: int) -> None:
    """Every projection of every layer becomes a QuantizedLinear over random GGUF blocks."""
    from miniinfer.models.packed_linear import QuantizedLinear
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            dense = getattr(parent, name)
            n, k = dense.weight.shape
            raw = rng.integers(0, 256, (n, k // 32, cpu_kernels.BLOCK_BYTES[fmt]), dtype=np.uint8)
            raw[:, :, 0:2] = rng.uniform(-0.05, 0.05, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
            if fmt == "Q4_1":
                raw[:, :, 2:4] = rng.uniform(-0.2, 0.2, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
            bias = None if dense.bias is None else dense.bias.detach()
            setattr(parent, name, QuantizedLinear(torch.from_numpy(raw.reshape(n, -1)), k, bias, fmt))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_smollm2_fused_decode_equals_module_path(smol_llm, isa):
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {cpu_kernels.supported_isas()})")
    qs = ["Write a story about a dragon.", "What is 2+2?", "Name three colors of the rainbow."]
    prompts = [smol_llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    with cpu_kernels.use_isa(isa):
        fused = _run(smol_llm, prompts, True)
        from miniinfer.models.cpu_decode import CPUDecodePlan
        assert isinstance(smol_llm.engine.runner.model.cpu_decode, CPUDecodePlan)
        _assert_same(fused, _run(smol_llm, prompts, False))
    smol_llm.engine.runner.model.cpu_decode = None


@pytest.mark.parametrize("name,fmt", [("qwen2", "Q4_1"), ("qwen3", "Q8_0"), ("llama", "Q4_1")])
def test_tiny_models_fused_decode_equals_module_path(tiny_llm, name, fmt):
    from miniinfer.models.cpu_decode import CPUDecodePlan
    llm = tiny_llm(name, cpu_packed_weights=False)
    model = llm.engine.runner.model
    _quantize_projections(model, fmt, seed=3)
    prompts = random_prompts(5, seed=11, min_len=3, max_len=40)
    fused = _run(llm, prompts, True)
    assert isinstance(model.cpu_decode, CPUDecodePlan)
    _assert_same(fused, _run(llm, prompts, False))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_int8_fused_decode_equals_module_path(tiny_llm, isa):
    """int8 activations on every Q4_1 call (``use_int8_activations(model, 1)``): the one C call
    runs the steps with them (1-row decodes included) and gives the module path's bits; with
    the layers disagreeing, the module path runs."""
    from miniinfer.models.cpu_decode import CPUDecodePlan
    from miniinfer.models.packed_linear import use_int8_activations
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {cpu_kernels.supported_isas()})")
    llm = tiny_llm("llama", cpu_packed_weights=False)
    model = llm.engine.runner.model
    _quantize_projections(model, "Q4_1", seed=3)
    prompts = random_prompts(5, seed=11, min_len=3, max_len=40)
    with cpu_kernels.use_isa(isa):
        fp32 = _run(llm, prompts, True)
        assert use_int8_activations(model, 1) == 4 * len(model.layers)
        fused = _run(llm, prompts, True)
        plan = model.cpu_decode
        assert isinstance(plan, CPUDecodePlan) and plan.int8(1) is True
        module = _run(llm, prompts, False)
        for x, y in zip(fused, module):
            assert x.token_ids == y.token_ids
            assert [{t: p.logprob for t, p in lp.items()} for lp in x.logprobs] == \
                   [{t: p.logprob for t, p in lp.items()} for lp in y.logprobs]
        lp = [p.logprob for o in fused for d in o.logprobs for p in d.values()]
        lp32 = [p.logprob for o in fp32 for d in o.logprobs for p in d.values()]
        if cpu_kernels.int8_kernel() is not None:  # the portable path has no int8 kernel: fp32
            assert lp != lp32
        model.layers[1].mlp.down_proj.int8_min_rows = 2
        assert plan.int8(1) is None and plan.int8(2) is True
    use_int8_activations(model, None)


def test_dense_weights_keep_the_module_path(tiny_llm):
    llm = tiny_llm("qwen2")
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert llm.engine.runner.model.cpu_decode is False


def _tree_step(model, seed: int):
    """A decode, a draft-tree verify (root + 15 nodes over a 90-token prefix) and a plain extend,
    over random K/V in the model's bound cache; tree bits per the rule in attention/metadata.py."""
    from miniinfer.attention.metadata import AttentionMetadata
    g = torch.Generator().manual_seed(seed)
    attn = model.layers[0].self_attn
    bs = attn.k_cache.shape[1]
    for layer in model.layers:
        layer.self_attn.k_cache.copy_(torch.randn(layer.self_attn.k_cache.shape, generator=g))
        layer.self_attn.v_cache.copy_(torch.randn(layer.self_attn.v_cache.shape, generator=g))
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, 16)]
    P, n = 90, len(parents)
    L = P + n
    bits, depth = [], []
    for i in range(n):
        seen, a = set(range(P)), i
        while a >= 0:
            seen.add(P + a)
            a = parents[a]
        depth.append(len(seen) - P - 1)
        u = sum(1 << (j - (L - 64)) for j in seen if j >= L - 64)
        bits.append(u - (1 << 64) if u >= 1 << 63 else u)
    seqs = [(40, 1), (P, n), (25, 3)]
    perm = torch.randperm(attn.k_cache.shape[0], generator=g).tolist()
    tables = [perm[8 * i:8 * i + 8] for i in range(3)]
    slots = [t[p // bs] * bs + p % bs for t, (pre, m) in zip(tables, seqs) for p in range(pre, pre + m)]
    positions = [40] + [P + d for d in depth] + [25, 26, 27]
    qsl, lens = [0, 1, 1 + n, 4 + n], [41, L, 28]
    tree = [-1] + bits + [-1] * 3
    meta = AttentionMetadata(
        num_decodes=1, num_decode_tokens=1, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=n, max_seq_len=L, query_start_loc_cpu=qsl,
        seq_lens_cpu=lens, tree_mask=torch.tensor(tree), tree_mask_cpu=tree)
    ids = torch.randint(0, model.embed_tokens.num_embeddings, (len(slots),), generator=g)
    return ids, torch.tensor(positions), meta


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_fused_tree_verify_equals_module_path(tiny_llm, isa):
    """decode_layers with a tree mask (the one-call path) against the module path (per-layer
    attention backend, itself checked against the rule in tests/attention/test_tree_mask.py)."""
    from miniinfer.attention.metadata import forward_context
    from miniinfer.models.cpu_decode import CPUDecodePlan
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels")
    llm = tiny_llm("qwen2", cpu_packed_weights=False)
    model = llm.engine.runner.model
    _quantize_projections(model, "Q4_1", seed=5)
    ids, pos, meta = _tree_step(model, seed=1)
    outs = {}
    with cpu_kernels.use_isa(isa), torch.no_grad():
        for name, mode, tree in (("fused", None, True), ("module", False, True), ("causal", None, False)):
            model.cpu_decode = mode
            meta.per_step.clear()
            meta.tree_mask, meta.tree_mask_cpu = (meta.tree_mask, meta.tree_mask_cpu) if tree else (None, None)
            with forward_context(meta):
                outs[name] = model(ids, pos)
            if name == "fused":
                assert isinstance(model.cpu_decode, CPUDecodePlan)
                assert model.cpu_decode.rows(model.embed(ids), meta) is not None  # it ran the one C call
    torch.testing.assert_close(outs["fused"], outs["module"], rtol=1e-4, atol=1e-4)
    assert (outs["fused"][1:17] - outs["causal"][1:17]).abs().amax() > 1e-2  # the mask mattered
    torch.testing.assert_close(outs["fused"][17:], outs["causal"][17:], rtol=1e-4, atol=1e-4)
