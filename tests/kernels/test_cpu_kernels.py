"""The C CPU kernels: Q4_1 / Q8_0 GEMM against the dequantized weights, paged decode attention
against SDPA over the gathered context, the element-wise ops against torch, and their input
checks. Every kernel test runs once per implementation (``isa``: avx512, avx2, scalar) that
this CPU supports; the portable one runs everywhere the library builds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from miniinfer.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="the C kernels did not build (no gcc/cc? see the warning logged)")


def _why_not(name: str) -> str:
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{name} is x86-64 only (this is {platform.machine()}: the portable path runs)"
    need = {"avx2": "AVX2 + FMA + F16C", "avx512": "AVX-512F"}[name]
    return f"this CPU lacks {need} (it runs {', '.join(cpu_kernels.supported_isas())})"


@pytest.fixture(params=cpu_kernels.ISAS)
def isa(request):
    """Run the test on one kernel implementation (skipped, with the reason, where this CPU lacks it)."""
    if not cpu_kernels.available():
        pytest.skip("the C kernels did not build")
    if request.param not in cpu_kernels.supported_isas():
        pytest.skip(_why_not(request.param))
    with cpu_kernels.use_isa(request.param):
        assert cpu_kernels.isa() == request.param
        yield request.param


def _q4_1_blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random GGUF Q4_1 rows: fp16 scale and min per 32 weights, then 16 nibble bytes."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    d = rng.uniform(0.002, 0.02, (n, nb)).astype(np.float16)
    m = (-8 * d.astype(np.float32) * rng.uniform(0.8, 1.2, (n, nb))).astype(np.float16)
    b = np.empty((n, nb, 20), np.uint8)
    b[:, :, 0:2] = d.view(np.uint8).reshape(n, nb, 2)
    b[:, :, 2:4] = m.view(np.uint8).reshape(n, nb, 2)
    b[:, :, 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return torch.from_numpy(b.reshape(n, nb * 20))


def _q8_0_blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random GGUF Q8_0 rows: fp16 scale per 32 weights, then 32 int8."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    d = rng.uniform(0.0005, 0.005, (n, nb)).astype(np.float16)
    b = np.empty((n, nb, 34), np.uint8)
    b[:, :, 0:2] = d.view(np.uint8).reshape(n, nb, 2)
    b[:, :, 2:] = rng.integers(0, 256, (n, nb, 32), dtype=np.uint8)
    return torch.from_numpy(b.reshape(n, nb * 34))


BLOCKS = {"Q4_1": _q4_1_blocks, "Q8_0": _q8_0_blocks}


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_dequantize_matches_gguf(fmt):
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType
    blocks = BLOCKS[fmt](32, 96)
    ref = gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[fmt]).reshape(32, 96)
    assert np.array_equal(cpu_kernels.dequantize(blocks, 96, fmt).numpy(), ref)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 16, 100])
def test_gemm_matches_dequantized(isa, fmt, n, k, m):
    blocks = BLOCKS[fmt](n, k, seed=n + k)
    w = cpu_kernels.dequantize(blocks, k, fmt).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = cpu_kernels.gemm(x, cpu_kernels.repack(blocks, k, fmt), n, k, fmt)
    ref = x.double() @ w.t()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_gemm_with_subnormal_negative_and_zero_scales(isa, fmt):
    """fp16 scales the portable path converts by hand: subnormal, negative, zero, large."""
    n, k = 32, 128
    blocks = BLOCKS[fmt](n, k, seed=7).clone()
    nb, width = k // 32, cpu_kernels.BLOCK_BYTES[fmt]
    raw = blocks.numpy().reshape(n, nb, width)
    special = np.array([3e-7, -3e-7, 6e-8, 0.0, -0.0, -0.02, 900.0, 6.1e-5], dtype=np.float16)
    rng = np.random.default_rng(1)
    picks = special[rng.integers(0, len(special), (n, nb))]
    raw[:, :, 0:2] = picks.view(np.uint8).reshape(n, nb, 2)
    if fmt == "Q4_1":
        raw[:, :, 2:4] = (-picks).view(np.uint8).reshape(n, nb, 2)
    w = cpu_kernels.dequantize(blocks, k, fmt).double()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(3))
    for m in (1, 3):
        y = cpu_kernels.gemm(x[:m], cpu_kernels.repack(blocks, k, fmt), n, k, fmt)
        ref = x[:m].double() @ w.t()
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def _q8_1_dequantized(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernel sees it: per row and 32-block, round(x * 127 / max|x|) (fp32,
    ties to even, as the C code) times max|x| / 127."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round(xb * inv)
    return (q.double() * (amax / 127.0).double()).reshape(x.shape)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17, 100, 300])
def test_q4_1_int8_activations(isa, n, k, m):
    """gemm(..., int8=True): exactly a GEMM of the dequantized weights and the int8-quantized
    activations (integer block sums; only the fp32 sum over blocks rounds), and within 1e-2
    relative Frobenius error of the fp32 GEMM (int8 rounding of Gaussian x per 32-block, step
    max|x| / 127 with max|x| ~ 2.2 sigma, leaves ~0.5%: llama.cpp's Q8_1 error). The portable
    path has no int8 kernel: it runs fp32."""
    blocks = _q4_1_blocks(n, k, seed=n + k)
    w = cpu_kernels.dequantize(blocks, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] *= 50  # an outlier block: its own scale, the others unaffected
    if k >= 64:
        x[-1, 32:64] = 0  # an all-zero block: scale 0
    y = cpu_kernels.gemm(x, cpu_kernels.repack(blocks, k), n, k, int8=True)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = x.double() @ w.t()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    if cpu_kernels.int8_kernel() is None:
        assert isa == "scalar" and err < 1e-6
        return
    exact = _q8_1_dequantized(x) @ w.t()
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    assert 1e-4 < err < (1e-2 if k > 32 else 2e-2)  # K = 32: one block, sums of 32 terms cancel more


@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536)])
def test_q4_1_int8_row_does_not_depend_on_the_call(isa, n, k):
    """gemm(..., int8=True): row i's output has the same bits whether it runs alone or at any
    place of a 2-, 4-, 7- or 16-row call (tiles of every size and remainder). Speculative
    decoding's verify rows and the decode rows it replaces must agree exactly for greedy
    output to stay the same. The portable path runs its fp32 tile here (no int8 kernel)."""
    packed = cpu_kernels.repack(_q4_1_blocks(n, k, seed=k), k)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(k))
    x[3, :32] *= 50  # an outlier block
    x[5, 32:64] = 0  # an all-zero block
    alone = torch.cat([cpu_kernels.gemm(x[i:i + 1], packed, n, k, int8=True) for i in range(16)])
    for m in (2, 4, 7, 16):
        for start in range(0, 16 - m + 1, m):
            y = cpu_kernels.gemm(x[start:start + m], packed, n, k, int8=True)
            diff = (y != alone[start:start + m]).any(-1).nonzero().flatten().tolist()
            assert not diff, f"{isa} ({cpu_kernels.int8_kernel()}), M = {m}: rows {diff} differ from alone"


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536)])
def test_fp32_row_does_not_depend_on_the_call(isa, fmt, n, k):
    """gemm(...) with fp32 activations (Q4_1 layers; Q8_0 also for the LM head in int8 mode):
    row i's output has the same bits whether it runs alone or at any place of a 2-, 3-, 4-, 7-
    or 16-row call (full register tiles and every remainder). Verify rows of speculative
    decoding and the decode rows they replace must agree exactly (lossless greedy output)."""
    packed = cpu_kernels.repack(BLOCKS[fmt](n, k, seed=k), k, fmt)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(k + 1))
    x[3, :32] *= 50  # an outlier block
    x[5, 32:64] = 0  # an all-zero block
    alone = torch.cat([cpu_kernels.gemm(x[i:i + 1], packed, n, k, fmt) for i in range(16)])
    for m in (2, 3, 4, 7, 16):
        for start in range(0, 16 - m + 1, m):
            y = cpu_kernels.gemm(x[start:start + m], packed, n, k, fmt)
            diff = (y != alone[start:start + m]).any(-1).nonzero().flatten().tolist()
            assert not diff, f"{isa} {fmt}, M = {m} at {start}: rows {[start + i for i in diff]} differ from alone"


def test_int8_kernel_per_path():
    """avx512 runs VNNI where the CPU has it (else the AVX2 int8 code), avx2 its own, portable none."""
    import ctypes
    lib = cpu_kernels._library()
    for name in cpu_kernels.supported_isas():
        with cpu_kernels.use_isa(name):
            kernel = cpu_kernels.int8_kernel()
        if name == "scalar":
            assert kernel is None
        elif name == "avx2":
            assert kernel == "avx2"
        else:
            assert kernel in ("avx2", "avx512-vnni")
    assert isinstance(lib, ctypes.CDLL)


def test_int8_activations_end_to_end_close_to_fp32():
    """The embedded SmolLM2 with ``cpu_int8_activations``: every Q4_1 layer runs int8; its
    prefill logits stay within 10% relative Frobenius of the fp32 model (measured ~3-5%: ~0.8%
    per GEMM, compounded over 30 layers), and most greedy top-1 picks agree. (Greedy text vs
    transformers may differ at near-ties: the option is off by default.)"""
    from miniinfer import LLM
    from miniinfer.models.packed_linear import INT8_MIN_ROWS, QuantizedLinear, use_int8_activations
    if cpu_kernels.int8_kernel() is None:
        pytest.skip("no int8 kernel on this machine's path")
    llm = LLM(None, dtype="float32", max_model_len=512, progress=False, cpu_int8_activations=True)
    model = llm.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.fmt == "Q4_1"]
    assert layers and all(m.int8_min_rows == INT8_MIN_ROWS for m in layers)
    ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog. " * 6, add_special_tokens=False)
    ours = llm.engine.runner.forward_logits(ids)
    assert use_int8_activations(model, None) == len(layers)
    ref = llm.engine.runner.forward_logits(ids)
    assert ((ours - ref).norm() / ref.norm()).item() < 0.1
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_shape_checks():
    with pytest.raises(ValueError, match="rows % 16"):
        cpu_kernels.repack(_q4_1_blocks(8, 32), 32)
    with pytest.raises(ValueError, match="format must be one of"):
        cpu_kernels.repack(_q4_1_blocks(16, 32), 32, "Q5_K")
    packed = cpu_kernels.repack(_q4_1_blocks(16, 64), 64)
    with pytest.raises(ValueError, match=r"expected fp32 \[M, 64\]"):
        cpu_kernels.gemm(torch.randn(2, 32), packed, 16, 64)


def _paged_case(seed=0, B=5, H=6, HKV=2, D=64, BS=4, nblocks=64):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (B,), generator=g)
    width = int((lens.max() + BS - 1) // BS)
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:width] for _ in range(B)]).int()
    kc = torch.randn(nblocks, BS, HKV, D, generator=g)
    vc = torch.randn(nblocks, BS, HKV, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    return q, kc, vc, tables, lens


@pytest.mark.parametrize("seed,D", [(0, 64), (1, 64), (2, 128), (3, 32), (4, 80), (5, 16)])
def test_paged_decode_attention_matches_sdpa(isa, seed, D):
    q, kc, vc, tables, lens = _paged_case(seed, D=D)
    out = cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens, int(lens.max()), 0.125)
    for b in range(q.shape[0]):
        L = int(lens[b])
        slots = [int(tables[b, t // 4]) * 4 + t % 4 for t in range(L)]
        k = kc.flatten(0, 1)[slots].transpose(0, 1)  # [Hkv, L, D]
        v = vc.flatten(0, 1)[slots].transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(out[b], ref.squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [64, 128])
def test_paged_decode_attention_long_contexts(isa, D):
    """Hundreds of tokens over 16-token blocks, lengths that are no multiple of the vector width."""
    g = torch.Generator().manual_seed(D)
    B, H, HKV, BS, nblocks = 3, 8, 2, 16, 80
    lens = torch.tensor([1, 257, 611])
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:39] for _ in range(B)]).int()
    kc, vc = torch.randn(nblocks, BS, HKV, D, generator=g), torch.randn(nblocks, BS, HKV, D, generator=g)
    q = torch.randn(B, H, D, generator=g) * 2
    out = cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens, int(lens.max()), D ** -0.5)
    for b in range(B):
        L = int(lens[b])
        slots = [int(tables[b, t // BS]) * BS + t % BS for t in range(L)]
        k = kc.flatten(0, 1)[slots].transpose(0, 1)
        v = vc.flatten(0, 1)[slots].transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, scale=D ** -0.5, enable_gqa=True)
        torch.testing.assert_close(out[b], ref.squeeze(1), rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_rejects_what_would_crash():
    q, kc, vc, tables, lens = _paged_case()
    with pytest.raises(ValueError, match="block table entries"):
        cpu_kernels.paged_decode_attention(q, kc, vc, tables + 1000, lens, int(lens.max()), 0.125)
    with pytest.raises(ValueError, match="seq_lens"):
        cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens + 1000, int(lens.max()) + 1000, 0.125)
    with pytest.raises(ValueError, match="fp32"):
        cpu_kernels.paged_decode_attention(q, kc.bfloat16(), vc, tables, lens, int(lens.max()), 0.125)
    q, kc, vc, tables, lens = _paged_case(D=144)
    with pytest.raises(ValueError, match="head_dim"):
        cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens, int(lens.max()), 0.125)


def test_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    """A compiler that fails (or a cache that can't be written) means no kernels, not a crash."""
    import subprocess
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached there: must compile
    cpu_kernels._library.cache_clear()

    def failing_run(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0], stderr=b"cc1: error: bad flag")

    monkeypatch.setattr(cpu_kernels.subprocess, "run", failing_run)
    try:
        assert not cpu_kernels.available()
        assert "CPU kernels not built" in caplog.text and "bad flag" in caplog.text
        assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind
    finally:
        cpu_kernels._library.cache_clear()  # later callers build (or find) the real library


@pytest.mark.parametrize("rows", [1, 16, 100])
def test_rms_norm_and_fused_add_match_torch(isa, rows):
    g = torch.Generator().manual_seed(rows)
    x, res, w = torch.randn(rows, 576, generator=g) * 3, torch.randn(rows, 576, generator=g), torch.rand(576) + 0.5
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)
    summed = x + res
    out = cpu_kernels.rms_norm(x, w, 1e-5, residual=res)
    assert torch.equal(res, summed)  # the residual is updated in place
    torch.testing.assert_close(out, summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * w,
                               rtol=1e-5, atol=1e-5)


def test_silu_and_mul_matches_torch_including_extremes(isa):
    g = torch.randn(7, 2 * 64) * 6
    g[0, :16] = torch.tensor([-100., -20., -1., 0., 1., 20., 100., -0.5, 88., -88., 1e-8, -1e-8, 3., -3., 50., -50.])
    ref = F.silu(g[:, :64]) * g[:, 64:]
    torch.testing.assert_close(cpu_kernels.silu_and_mul(g), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rot,D", [(64, 64), (32, 64)])
def test_rope_neox_matches_torch_on_strided_rows(isa, rot, D):
    from miniinfer.kernels.rope import apply_rope_ref
    from miniinfer.models.rotary import build_cos_sin_cache
    cache = build_cos_sin_cache(rot, 200, 10000.0, None)
    qkv = torch.randn(9, (4 + 2 + 2) * D)  # q: 4 heads, k: 2, v: 2, side by side per row
    pos = torch.randint(0, 200, (9,))
    out = cpu_kernels.rope_neox(qkv, 6, D, pos, cache)
    q_ref, k_ref = apply_rope_ref(pos, qkv[:, :4 * D].reshape(9, 4, D).clone(),
                                  qkv[:, 4 * D:6 * D].reshape(9, 2, D).clone(), cache, rot)
    torch.testing.assert_close(out, torch.cat([q_ref, k_ref], 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        cpu_kernels.rope_neox(qkv, 6, D, pos + 200, cache)


def test_store_kv_writes_slots_and_skips_minus_one(isa):
    kc, vc = torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)
    kv = torch.randn(5, 3, 2, 16)  # rows of a wider tensor: k = kv[:, 0], v = kv[:, 1]
    slots = torch.tensor([3, -1, 31, 0, 12])
    cpu_kernels.store_kv(kv[:, 0], kv[:, 1], kc, vc, slots)
    flat_k, flat_v = kc.view(32, 2, 16), vc.view(32, 2, 16)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], kv[t, 0]) and torch.equal(flat_v[s], kv[t, 1])
    assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == 4
    with pytest.raises(ValueError, match="slot_mapping"):
        cpu_kernels.store_kv(kv[:, 0], kv[:, 1], kc, vc, torch.tensor([32, 0, 0, 0, 0]))


def test_isa_choice_env_var_and_forcing(monkeypatch, caplog):
    """MINIINFER_CPU_ISA picks the path at load (logged); set_isa / use_isa switch it later;
    a path this CPU lacks, or an unknown name, falls back to the best one with a warning."""
    import logging
    supported = cpu_kernels.supported_isas()
    assert supported[0] == "scalar" and set(supported) <= set(cpu_kernels.ISAS)
    assert cpu_kernels._pick_isa(None, supported) == supported[-1]
    assert cpu_kernels._pick_isa("auto", supported) == supported[-1]
    assert cpu_kernels._pick_isa("SCALAR", supported) == "scalar"
    with caplog.at_level(logging.WARNING, logger="miniinfer"):
        assert cpu_kernels._pick_isa("avx512", ("scalar", "avx2")) == "avx2"
        assert cpu_kernels._pick_isa("sse9", supported) == supported[-1]
    assert "does not support" in caplog.text and "sse9" in caplog.text
    with pytest.raises(ValueError, match="unknown CPU kernel path"):
        cpu_kernels.set_isa("sse9")
    before = cpu_kernels.isa()
    try:
        monkeypatch.setenv(cpu_kernels.ISA_ENV, "scalar")
        cpu_kernels._library.cache_clear()
        with caplog.at_level(logging.INFO, logger="miniinfer"):
            assert cpu_kernels.isa() == "scalar"
        assert "CPU kernels: scalar path" in caplog.text
        with cpu_kernels.use_isa(supported[-1]):
            assert cpu_kernels.isa() == supported[-1]
        assert cpu_kernels.isa() == "scalar"
        assert cpu_kernels.set_isa(None) == "scalar"  # the default: the env var's
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    assert cpu_kernels.isa() == before


def test_build_is_portable():
    """No machine-specific flags: a library cached on one x86-64 CPU runs on any other (its
    code path is picked at run time), so the cache key need not name the CPU."""
    assert not any(f.startswith(("-march", "-mtune", "-mavx", "-mcpu")) for f in cpu_kernels._FLAGS)


def test_portable_only_build_as_on_other_architectures(tmp_path):
    """The library as ARM64 and others build it (no x86 code at all: -DMI_PORTABLE_ONLY) compiles,
    runs only the portable path, and its GEMM matches the dequantized weights."""
    import ctypes
    import shutil
    import subprocess
    cc = shutil.which("gcc") or shutil.which("cc")
    so = tmp_path / "portable.so"
    subprocess.run([cc, *cpu_kernels._FLAGS, "-DMI_PORTABLE_ONLY", "-Wall", "-Werror", cpu_kernels._SOURCE,
                    "-o", str(so)], check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(so))
    assert lib.miniinfer_cpu_isas() == 1 and lib.miniinfer_isa() == 0 and lib.miniinfer_set_isa(1) == -1
    blocks = _q4_1_blocks(48, 96, seed=5)
    x = torch.randn(3, 96)
    y = torch.empty(3, 48)
    packed = cpu_kernels.repack(blocks, 96)
    lib.q4_1_gemm(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                  3, 48, 96)
    ref = x.double() @ cpu_kernels.dequantize(blocks, 96).double().t()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_each_pass_uses_only_its_instructions():
    """What makes one build safe on every x86-64 CPU, checked in the machine code of the built
    library: only the avx512 pass has AVX-512 (zmm, mask or EVEX-only registers), only the avx2
    and avx512 passes have any VEX instruction; the portable pass, the dispatch and everything
    else stay baseline x86-64 (SSE2)."""
    import platform
    import re
    import shutil
    import subprocess
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"checks x86-64 machine code (this is {platform.machine()})")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils) to read the library's machine code")
    lib = cpu_kernels._build(shutil.which("gcc") or shutil.which("cc"))
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", lib], check=True, capture_output=True,
                          text=True).stdout
    avx512_only = re.compile(r"zmm|%k[0-7]\b|[xy]mm(1[6-9]|2\d|3[01])\b")
    seen = {"avx2": 0, "avx512": 0, "other": 0}
    fn = ""
    for line in text.splitlines():
        if m := re.match(r"[0-9a-f]+ <(.+)>:$", line):
            fn = m.group(1)
            continue
        if not (m := re.match(r"\s+[0-9a-f]+:\t(\S+)\s*(.*)", line)):
            continue
        mnemonic, operands = m.groups()
        kind = "avx512" if "_avx512" in fn else "avx2" if "_avx2" in fn else "other"
        seen[kind] += 1
        if kind == "avx2":
            assert not avx512_only.search(operands), f"AVX-512 in {fn}: {mnemonic} {operands}"
        elif kind == "other":
            assert not mnemonic.startswith("v") and "ymm" not in operands, f"AVX in {fn}: {mnemonic} {operands}"
    assert all(seen.values()), seen
