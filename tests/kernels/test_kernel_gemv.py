"""Decode GEMV / skinny GEMM (``kernels/gemv.py``) vs its torch reference, and the
``models.linear.Linear`` fallback. Small shapes: these run under Triton's CPU interpreter.

    .venv/bin/python -m pytest -q tests/kernels/test_kernel_gemv.py
"""
import pytest
import torch

from _kernels_testlib import assert_close

# (M, N, K): N and K not multiples of the blocks used below, M over the row buckets
SHAPES = [(1, 37, 200), (2, 24, 96), (2, 21, 64), (3, 19, 160), (8, 33, 72)]
CONFIG_NAMES = ["fma", "fma-split3", "fma-bn1", "dot", "dot-split2"]


def _configs():
    from miniinfer.kernels.gemv import GemvConfig

    return {
        "fma": GemvConfig(block_n=4, block_k=32, split_k=1, num_warps=2),
        "fma-split3": GemvConfig(block_n=8, block_k=32, split_k=3, num_warps=2),
        "fma-bn1": GemvConfig(block_n=1, block_k=64, split_k=2, num_warps=1),
        "dot": GemvConfig(block_n=16, block_k=32, split_k=1, use_dot=True),
        "dot-split2": GemvConfig(block_n=16, block_k=16, split_k=2, use_dot=True),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_name,M,N,K", [(c, *shape) for c in CONFIG_NAMES for shape in SHAPES
                                             if c.startswith("dot") or shape[0] <= 2])  # FMA: 1-2 rows
def test_gemv_matches_ref(device, dtype, cfg_name, M, N, K):
    from miniinfer.kernels.gemv import gemv, gemv_ref

    has_bias = (M + N) % 2 == 1  # alternate across shapes: each config sees both
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if has_bias else None
    y = gemv(x, w, b, config=_configs()[cfg_name])
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, gemv_ref(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_out_strided_x_and_bias(device, dtype):
    """Strided x rows (a view of a wider buffer), ``out=`` given, bias, default config."""
    from miniinfer.kernels.gemv import gemv, gemv_ref

    M, N, K = 3, 50, 130
    x = torch.randn(M, K + 14, device=device).to(dtype)[:, :K]
    w = torch.randn(N, K, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    out = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    y = gemv(x, w, b, out=out)
    assert y is out
    assert_close(out, gemv_ref(x, w, b))


def test_gemv_split_k_is_deterministic_and_close_to_unsplit(device):
    from miniinfer.kernels.gemv import GemvConfig, gemv

    x = torch.randn(2, 256, device=device)
    w = torch.randn(20, 256, device=device)
    cfg = GemvConfig(block_n=4, block_k=32, split_k=4, num_warps=2)
    y1, y2 = gemv(x, w, config=cfg), gemv(x, w, config=cfg)
    assert torch.equal(y1, y2)
    y0 = gemv(x, w, config=GemvConfig(block_n=4, block_k=32, num_warps=2))
    torch.testing.assert_close(y1, y0, atol=1e-4, rtol=1e-4)


def test_gemv_rejects_bad_inputs(device):
    from miniinfer.kernels.gemv import GemvConfig, gemv

    w = torch.randn(8, 32, device=device)
    with pytest.raises(AssertionError):
        gemv(torch.randn(9, 32, device=device), w)  # too many rows
    with pytest.raises(AssertionError):
        gemv(torch.randn(1, 16, device=device), w)  # K mismatch
    with pytest.raises(AssertionError):  # FMA path with 3 rows
        gemv(torch.randn(3, 32, device=device), w, config=GemvConfig(block_n=4, block_k=32))
    with pytest.raises(AssertionError):
        gemv(torch.randn(1, 32, device=device).to(torch.bfloat16), w)  # dtype mismatch
    with pytest.raises(AssertionError):
        gemv(torch.randn(1, 32, device=device), torch.randn(32, 8, device=device).t())  # W not contiguous


def test_gemv_config_heuristic_and_table(device):
    from miniinfer.kernels import gemv as g

    dev = torch.device(device)
    for M in (1, 2, 3, 8):
        for N, K in [(3584, 3584), (3584, 18944), (152064, 3584), (1152, 896)]:
            cfg = g.gemv_config(M, N, K, dev)
            assert cfg.split_k >= 1 and cfg.block_k <= 1024
            assert not cfg.use_dot or cfg.block_n >= 16
    tuned = g.GemvConfig(block_n=8, block_k=512, split_k=2, num_warps=8, num_stages=3)
    g.TUNED[(4096, 4096, 4)] = tuned
    try:
        assert g.gemv_config(3, 4096, 4096, dev) is tuned
        assert g.gemv_config(2, 4096, 4096, dev) is not tuned
    finally:
        del g.TUNED[(4096, 4096, 4)]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_falls_back_on_cpu(bias):
    """On CPU (or with gemv off) ``Linear`` is exactly ``nn.Linear``, with the same parameters."""
    from miniinfer.models import linear as L

    torch.manual_seed(1)
    ref = torch.nn.Linear(48, 20, bias=bias)
    lin = L.Linear(48, 20, bias=bias)
    lin.load_state_dict(ref.state_dict())
    assert set(dict(lin.named_parameters())) == set(dict(ref.named_parameters()))
    for shape in [(1, 48), (3, 48), (2, 5, 48), (20, 48)]:
        x = torch.randn(*shape)
        assert torch.equal(lin(x), ref(x))
    assert not L.use_gemv(torch.randn(1, 48), lin.weight)  # CPU input


def test_linear_gemv_path_under_interpreter(monkeypatch, device):
    """The GEMV branch of ``Linear.forward`` (forced on CPU): leading dims flattened, bias
    added, result close to ``nn.Linear``; ``GEMV_ENABLED = False`` turns it off."""
    from miniinfer.models import linear as L

    lin = L.Linear(64, 24, bias=True).to(device=device, dtype=torch.bfloat16)
    calls = []
    real = L._gemv
    monkeypatch.setattr(L, "use_gemv", lambda x, w: L.GEMV_ENABLED and x.dtype == w.dtype)
    monkeypatch.setattr(L, "_gemv", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 64).to(device=device, dtype=torch.bfloat16)
    y = lin(x)
    assert calls and y.shape == (2, 3, 24)
    assert_close(y, torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).to(y.dtype))
    monkeypatch.setattr(L, "GEMV_ENABLED", False)
    calls.clear()
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias)) and not calls


# ---------------------------------------------------------------- SiLU-and-mul prologue
SILU_CASES = [("fma", 1, 37, 200), ("fma", 2, 21, 64), ("fma-split3", 2, 24, 96), ("fma-split3", 1, 19, 75),
              ("fma-bn1", 1, 33, 130), ("dot", 3, 19, 160), ("dot-split2", 2, 24, 40)]


def _silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    from miniinfer.kernels.activation import silu_and_mul

    return silu_and_mul(gate_up)  # the separate kernel: the fused prologue must match its rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_name,M,N,I", SILU_CASES)
def test_gemv_silu_mul_matches_unfused(device, dtype, cfg_name, M, N, I):
    """``gemv(gate_up, W, act="silu_mul")`` == ``gemv(silu_and_mul(gate_up), W)`` (same config):
    odd I (masked chunks), split-K on and off, 1-2 rows on the FMA path, the dot path too."""
    from miniinfer.kernels.gemv import gemv, gemv_ref

    cfg = _configs()[cfg_name]
    gate_up = (2 * torch.randn(M, 2 * I + 6, device=device)).to(dtype)[:, :2 * I]  # strided rows
    w = (torch.randn(N, I, device=device) / I ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if M == 1 else None
    h = _silu_mul_ref(gate_up)
    y = gemv(gate_up, w, b, config=cfg, act="silu_mul")
    assert y.shape == (M, N) and y.dtype == dtype
    y_unfused = gemv(h, w, b, config=cfg)
    if dtype == torch.float32:  # exp under the interpreter (numpy) vs torch: ulps apart
        torch.testing.assert_close(y, y_unfused, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(y.float(), y_unfused.float(), atol=1e-2, rtol=1e-2)
    assert_close(y, gemv_ref(h, w, b))


def test_gemv_silu_mul_default_config_and_errors(device):
    from miniinfer.kernels.gemv import gemv, gemv_ref

    gate_up = torch.randn(2, 2 * 300, device=device)
    w = torch.randn(40, 300, device=device) / 300 ** 0.5
    y = gemv(gate_up, w, act="silu_mul")  # the heuristic for K = 300 (split-K under 4 fake SMs)
    assert_close(y, gemv_ref(_silu_mul_ref(gate_up), w))
    with pytest.raises(AssertionError):
        gemv(gate_up, torch.randn(40, 600, device=device), act="silu_mul")  # weight K must be I
    with pytest.raises(AssertionError):
        gemv(gate_up, w, act="gelu")


def test_linear_silu_mul_paths(monkeypatch, device):
    """``linear_silu_mul`` / ``silu_mul_linear``: CPU -> ``F.linear(silu_and_mul(.))`` exactly;
    the GEMV branch forced on takes ``act="silu_mul"`` with leading dims flattened; a module
    that is not a ``Linear`` is called on the activated input."""
    from miniinfer.models import linear as L
    from miniinfer.models import ops

    lin = L.Linear(48, 20, bias=False)
    gate_up = torch.randn(3, 96)
    expected = torch.nn.functional.linear(ops.silu_and_mul(gate_up), lin.weight)
    assert torch.equal(L.silu_mul_linear(gate_up, lin), expected)
    plain = torch.nn.Linear(48, 20, bias=False)
    plain.load_state_dict(lin.state_dict())
    assert torch.equal(L.silu_mul_linear(gate_up, plain), plain(ops.silu_and_mul(gate_up)))

    lin = lin.to(device=device, dtype=torch.bfloat16)
    monkeypatch.setattr(L, "SILU_MUL_FUSED", True)  # off by default (measured slower on an H200)
    acts = []
    real = L._gemv
    monkeypatch.setattr(L, "use_gemv", lambda x, w: L.GEMV_ENABLED and x.dtype == w.dtype)
    monkeypatch.setattr(L, "_gemv", lambda x, w, b, act=None: acts.append(act) or real(x, w, b, act))
    gate_up = torch.randn(2, 1, 96).to(device=device, dtype=torch.bfloat16)
    y = L.silu_mul_linear(gate_up, lin)
    assert acts == ["silu_mul"] and y.shape == (2, 1, 20)
    assert_close(y, L.linear(_silu_mul_ref(gate_up.view(2, 96)), lin.weight).view(2, 1, 20))
    monkeypatch.setattr(L, "SILU_MUL_FUSED", False)  # A/B switch: silu_and_mul, then the plain GEMV
    acts.clear()
    L.silu_mul_linear(gate_up, lin)
    assert acts == [None]
