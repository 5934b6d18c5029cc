"""The C paged attention's tree-mask rows (``tree_bits``), on every kernel path this CPU runs: a
row of -1 attends to its first ``seq_lens[b]`` keys; a tree row sees keys below L - 64 and, of the
last 64, those whose bit is set (bit 63 = the last key, the int64's sign bit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miniinfer.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build")

BS, HKV, H = 16, 2, 6


@pytest.fixture(params=cpu_kernels.ISAS)
def isa(request):
    if request.param not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    with cpu_kernels.use_isa(request.param):
        yield request.param


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _case(lens, D, seed):
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-L // BS) for L in lens) + 5
    width = max(-(-L // BS) for L in lens)
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:width] for _ in lens]).int()
    kc = torch.randn(nblocks, BS, HKV, D, generator=g)
    vc = torch.randn(nblocks, BS, HKV, D, generator=g)
    q = torch.randn(len(lens), H, D, generator=g) * 2
    return q, kc, vc, tables


def _random_bits(L: int, g: torch.Generator) -> int:
    """Random window bits, the row's own key (L - 1: bit 63) always set."""
    u = int(torch.randint(0, 1 << 62, (1,), generator=g)) | int(torch.randint(0, 4, (1,), generator=g)) << 62
    return _signed(u | 1 << 63)


def _reference(q, kc, vc, tables, lens, bits, scale):
    out = torch.empty_like(q)
    for b, L in enumerate(lens):
        slots = [int(tables[b, t // BS]) * BS + t % BS for t in range(L)]
        k = kc.flatten(0, 1)[slots].transpose(0, 1)
        v = vc.flatten(0, 1)[slots].transpose(0, 1)
        keys = torch.arange(L)
        if bits[b] == -1:
            mask = torch.ones(L, dtype=torch.bool)
        else:
            u = bits[b] & ((1 << 64) - 1)
            mask = torch.tensor([j < L - 64 or bool(u >> (j - (L - 64)) & 1) for j in keys.tolist()])
        o = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, attn_mask=mask[None, None, :], scale=scale,
                                           enable_gqa=True)
        out[b] = o.squeeze(1)
    return out


@pytest.mark.parametrize("D", [32, 64, 80, 128])
def test_paged_decode_attention_tree_rows(isa, D):
    lens = [70, 70, 33, 200, 64, 5, 129]
    g = torch.Generator().manual_seed(D)
    bits = [_random_bits(L, g) for L in lens]
    bits[1] = -1  # a plain row among tree rows
    bits[4] = _signed(1 << 63)  # sees only the prefix below its window (none: L = 64) and itself
    q, kc, vc, tables = _case(lens, D, D)
    lens_t, bits_t = torch.tensor(lens), torch.tensor(bits, dtype=torch.int64)
    out = cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens_t, max(lens), D ** -0.5, bits_t)
    torch.testing.assert_close(out, _reference(q, kc, vc, tables, lens, bits, D ** -0.5), rtol=1e-5, atol=1e-5)
    plain = cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens_t, max(lens), D ** -0.5)
    torch.testing.assert_close(out[1], plain[1])  # -1 is no mask
    assert (out[0] - plain[0]).abs().amax() > 1e-3  # the mask does something
    all_minus_one = torch.full_like(bits_t, -1)
    assert torch.equal(cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens_t, max(lens), D ** -0.5,
                                                          all_minus_one), plain)


def test_tree_bits_shape_is_checked():
    q, kc, vc, tables = _case([10, 20], 32, 0)
    with pytest.raises(ValueError, match="tree_bits"):
        cpu_kernels.paged_decode_attention(q, kc, vc, tables, torch.tensor([10, 20]), 20, 0.1,
                                           torch.full((3,), -1, dtype=torch.int64))
    with pytest.raises(ValueError, match="seq_lens"):  # the bounds checks stay with bits
        cpu_kernels.paged_decode_attention(q, kc, vc, tables, torch.tensor([10, 2000]), 2000, 0.1,
                                           torch.full((2,), -1, dtype=torch.int64))
