"""The extend kernel's tree-mask variant (``HAS_TREE``) against the torch reference (itself checked
against the torch backend here, and that one against the rule in tests/attention/test_tree_mask.py),
and a prefill-graph buffer round trip (capture with the mask, replay a tree verify, then a plain
chunk). Small shapes: on CPU this runs under the Triton interpreter."""
import pytest
import torch

from _kernels_testlib import PagedKV, assert_close
from helpers import signed64, tree_bits

H, HKV, D, BS = 2, 1, 32, 16


def _step(seqs, device):
    """``seqs``: (prefix, n, bits or None); every key already in the cache (the kernel reads it)."""
    lens = [p + n for p, n, _ in seqs]
    kv = PagedKV(lens, HKV, D, BS, torch.float32, device)
    qsl, bits = [0], []
    for p, n, b in seqs:
        qsl.append(qsl[-1] + n)
        bits += b if b is not None else [-1] * n
    q = torch.randn(qsl[-1], H, D, device=device)
    return kv, q, torch.tensor(qsl, dtype=torch.int32, device=device), torch.tensor(bits, device=device)


def _cases():
    a = tree_bits(70, [-1, 0, 0, 1, 2, 2, 3, 0, 7, 4, 9, 1])  # window inside the prefix
    b = tree_bits(5, [-1, 0, 1, 1, 0, 4, 5, 2, 6])  # window starting below key 0
    b[3] = signed64(1 << 63)  # L = 14: sees itself only (no key of its first tiles: no NaN)
    mixed = [-1, -1, -1] + tree_bits(40, [-1, 0, 0, 1, 1, 2])[:6]  # causal rows next to tree rows in a tile
    return [(0, 10, None), (70, 12, a), (5, 9, b), (20, 3, None), (37, 9, mixed)]


def test_extend_tree_mask_matches_ref(device):
    from miniinfer.attention.metadata import AttentionMetadata
    from miniinfer.attention.torch_backend import TorchAttentionBackend
    from miniinfer.kernels.extend_attention import paged_extend_attention, paged_extend_attention_ref

    seqs = _cases()
    kv, q, qsl, bits = _step(seqs, device)
    scale = D ** -0.5
    out = paged_extend_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, 12, scale,
                                 block_m=16, block_n=16, tree_mask=bits)
    ref = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, scale,
                                     tree_mask=bits)
    assert_close(out, ref)
    meta = AttentionMetadata(
        num_decodes=0, num_decode_tokens=0, query_start_loc=qsl.cpu(), seq_lens=kv.seq_lens_t.cpu(),
        block_tables=kv.block_tables.cpu(), slot_mapping=torch.full((q.shape[0],), -1), max_query_len=12,
        max_seq_len=max(kv.seq_lens), tree_mask=bits.cpu())
    torch_out = TorchAttentionBackend()._attend(q.cpu(), kv.k_cache.cpu(), kv.v_cache.cpu(), meta, scale,
                                                torch.float32)
    assert_close(ref.cpu(), torch_out)
    causal = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, scale)
    assert (out[10:22] - causal[10:22]).abs().amax() > 1e-2  # the mask changed the tree rows
    assert_close(out[:10], causal[:10])  # and not the plain chunk


def test_prefill_graph_buffers_tree_round_trip(device):
    """Capture-time metadata carries the (all -1) mask; a replay of a tree verify, then of a
    plain chunk, through the same static buffers gives the masked, then the causal result."""
    from miniinfer.attention import get_backend
    from miniinfer.attention.metadata import AttentionMetadata
    from miniinfer.kernels.extend_attention import paged_extend_attention_ref

    size, scale = 16, D ** -0.5
    kv, q, _, bits = _step([(70, 12, _cases()[1][2])], device)
    buffers = get_backend("triton", "cuda").make_graph_buffers(4, size, 8, 256, torch.device(device))
    captured = buffers.capture_metadata("prefill", size)
    assert captured.tree_mask is not None and bool((captured.tree_mask == -1).all())
    buffers.reset()
    q_buf = torch.zeros(size, H, D, device=device)
    q_buf[:12] = q
    kv_new = torch.zeros(size, HKV, D, device=device)

    def replay(tree):
        live = AttentionMetadata(
            num_decodes=0, num_decode_tokens=0, query_start_loc=torch.tensor([0, 12], dtype=torch.int32,
                                                                             device=device),
            seq_lens=kv.seq_lens_t, block_tables=kv.block_tables, slot_mapping=torch.full((12,), -1, device=device),
            max_query_len=12, max_seq_len=82, tree_mask=tree)
        buffers.prepare_replay("prefill", size, live)
        out = get_backend("triton", "cuda").forward(q_buf, kv_new, kv_new, kv.k_cache, kv.v_cache, captured, scale)
        buffers.after_replay("prefill")
        return out[:12]

    qsl = torch.tensor([0, 12], dtype=torch.int32, device=device)
    ref_tree = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, scale,
                                          tree_mask=bits)
    ref_causal = paged_extend_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens_t, scale)
    assert_close(replay(bits), ref_tree)
    assert bool((buffers.tree_mask[12:] == -1).all())
    assert_close(replay(None), ref_causal)
    assert bool((buffers.tree_mask == -1).all())
