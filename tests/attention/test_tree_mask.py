"""Tree attention masks (EAGLE-2 verify of a draft tree): the torch and cpu backends against a
dense reference computed straight from the rule in ``attention/metadata.py``: a row of -1 is
causal; otherwise key j of a sequence of L keys is seen iff j < L - 64 or bit j - (L - 64) is set."""
from __future__ import annotations

import random

import pytest
import torch

from helpers import signed64, tree_bits
from miniinfer.attention.metadata import AttentionMetadata
from miniinfer.kernels import cpu_kernels

H, HKV, D, BS = 4, 2, 32, 16
WINDOW = 64


def random_parents(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def visible(bits: int, i: int, n: int, L: int) -> list[int]:
    """The rule, key by key (Python ints: bit 63 is the sign bit of the int64)."""
    if bits == -1:
        return list(range(L - n + i + 1))
    u = bits & ((1 << 64) - 1)
    return [j for j in range(L) if j < L - WINDOW or (u >> (j - (L - WINDOW))) & 1]


def dense_reference(q, k_cache, v_cache, tables, qsl, lens, bits, scale):
    out = torch.zeros_like(q)
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    for b, L in enumerate(lens):
        s, e = qsl[b], qsl[b + 1]
        slots = torch.tensor([tables[b][p // BS] * BS + p % BS for p in range(L)])
        k = kf[slots].repeat_interleave(H // HKV, dim=1)
        v = vf[slots].repeat_interleave(H // HKV, dim=1)
        for i in range(e - s):
            keys = torch.tensor(visible(bits[s + i], i, e - s, L))
            p = (torch.einsum("hd,lhd->hl", q[s + i], k[keys]) * scale).softmax(-1)
            out[s + i] = torch.einsum("hl,lhd->hd", p, v[keys])
    return out


def make_step(seqs, num_decodes: int, seed: int, host_copy: bool = True):
    """``seqs``: (prefix, n, bits or None) per sequence, decodes first. Random fp32 caches over a
    shuffled block pool; returns q, k, v (the new tokens), caches, metadata, tables."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n, _ in seqs]
    need = [-(-L // BS) for L in lens]
    nblocks = sum(need) + 7
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, at = [], 0
    for c in need:
        tables.append(perm[at:at + c])
        at += c
    width = max(need) + 1
    k_cache = torch.randn(nblocks, BS, HKV, D, generator=g)
    v_cache = torch.randn(nblocks, BS, HKV, D, generator=g)
    qsl, slots, bits = [0], [], []
    for (p, n, b), tab in zip(seqs, tables):
        qsl.append(qsl[-1] + n)
        slots += [tab[j // BS] * BS + j % BS for j in range(p, p + n)]
        bits += b if b is not None else [-1] * n
    t = qsl[-1]
    q, k, v = (torch.randn(t, h, D, generator=g) for h in (H, HKV, HKV))
    meta = AttentionMetadata(
        num_decodes=num_decodes, num_decode_tokens=num_decodes,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([tab + [0] * (width - len(tab)) for tab in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=max(n for _, n, _ in seqs), max_seq_len=max(lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens,
        tree_mask=torch.tensor(bits, dtype=torch.int64), tree_mask_cpu=bits if host_copy else None)
    return q, k, v, k_cache, v_cache, meta, tables


def _mixed_batch(seed: int):
    rng = random.Random(seed)
    short = random_parents(rng.randrange(2, 20), rng)  # window starts below key 0
    full = random_parents(64, rng)  # 1 + 63 draft nodes
    return [
        (37, 1, None),  # a decode
        (0, 21, None),  # a plain prefill chunk
        (50, 3, None),  # a plain extend
        (20, len(short), tree_bits(20, short)),
        (131, 64, tree_bits(131, full)),
    ]


def _backends():
    from miniinfer.attention import get_backend
    names = ["torch"] + (["cpu"] if cpu_kernels.available() else [])
    return [get_backend(n, "cpu") for n in names]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("host_copy", [True, False])
def test_tree_mask_mixed_batch(seed, host_copy):
    seqs = _mixed_batch(seed)
    for backend in _backends():
        q, k, v, kc, vc, meta, tables = make_step(seqs, 1, seed, host_copy)
        out = backend.forward(q, k, v, kc, vc, meta, D ** -0.5)
        ref = dense_reference(q, kc, vc, tables, meta.query_start_loc_cpu, meta.seq_lens_cpu,
                              meta.tree_mask.tolist(), D ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=backend.name)


def test_tree_mask_really_masks():
    """The same step without its tree mask gives other outputs on the tree rows (but the same
    on the plain rows): the test above would fail with the mask ignored."""
    seqs = _mixed_batch(0)
    for backend in _backends():
        q, k, v, kc, vc, meta, _ = make_step(seqs, 1, 0)
        with_tree = backend.forward(q, k, v, kc, vc, meta, D ** -0.5)
        meta.tree_mask = meta.tree_mask_cpu = None
        meta.per_step.clear()
        causal = backend.forward(q, k, v, kc, vc, meta, D ** -0.5)
        plain = 1 + 21 + 3
        torch.testing.assert_close(with_tree[:plain], causal[:plain], rtol=1e-5, atol=1e-5)
        assert (with_tree[plain:] - causal[plain:]).abs().amax() > 1e-2, backend.name


def _head_style_bits(P: int) -> list[int]:
    """L = P + 12: keys P .. P+7 are tree nodes written by an earlier step (not new now), the 4
    new tokens sit at P+8 .. P+11. Earlier nodes: 0 <- 1, 0 <- 2 <- 3, 4, ...; new tokens'
    parents are earlier nodes (so their rows see keys that are no new tokens of this step)."""
    L = P + 12
    sees = [  # window keys (beyond the prefix) each new token sees
        [P + 0, P + 1, P + 8],
        [P + 0, P + 2, P + 3, P + 9],
        [P + 4, P + 10],
        [P + 0, P + 2, P + 3, P + 9, P + 11],  # child of the second new token
    ]
    return [signed64(sum(1 << (j - (L - WINDOW)) for j in set(range(P)) | set(s) if j >= L - WINDOW))
            for s in sees]


@pytest.mark.parametrize("P", [10, 52, 70, 200])
def test_tree_mask_window_over_earlier_tree_keys(P):
    """The rule is on KV indices: a window holding keys of earlier steps works (the prefix
    ends both inside and before the window)."""
    bits = _head_style_bits(P)
    seqs = [(P + 8, 4, bits), (33, 5, None)]
    for backend in _backends():
        q, k, v, kc, vc, meta, tables = make_step(seqs, 0, P)
        out = backend.forward(q, k, v, kc, vc, meta, D ** -0.5)
        ref = dense_reference(q, kc, vc, tables, meta.query_start_loc_cpu, meta.seq_lens_cpu, bits + [-1] * 5,
                              D ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=backend.name)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_tree_mask_cpu_backend_every_isa(isa):
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels")
    from miniinfer.attention import get_backend
    seqs = _mixed_batch(5)
    with cpu_kernels.use_isa(isa):
        q, k, v, kc, vc, meta, tables = make_step(seqs, 1, 5)
        out = get_backend("cpu", "cpu").forward(q, k, v, kc, vc, meta, D ** -0.5)
    ref = dense_reference(q, kc, vc, tables, meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.tree_mask_cpu,
                          D ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tree_bits_helper_sign_bit():
    """The last key of a full window is bit 63: only the last row sees it, its int64 is negative."""
    bits = tree_bits(5, random_parents(64, random.Random(0)))
    assert bits[-1] < 0 and bits[-1] != -1 and all(b > 0 for b in bits[:-1])
    assert visible(bits[0], 0, 64, 69) == list(range(6))
