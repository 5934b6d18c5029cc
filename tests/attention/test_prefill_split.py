"""Host side of the split prefill path: the routing plan, the torch LSE merge, the config knob."""
from __future__ import annotations

import pytest
import torch

from miniinfer.attention.metadata import AttentionMetadata
from miniinfer.attention.prefill_split import merge_attn_states, plan_split


def _meta(q_lens: list[int], prefix: list[int], num_decodes: int, host: bool = True) -> AttentionMetadata:
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    lens = [p + n for p, n in zip(prefix, q_lens)]
    return AttentionMetadata(
        num_decodes=num_decodes, num_decode_tokens=num_decodes,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.zeros(len(lens), 1, dtype=torch.int32), slot_mapping=torch.zeros(qsl[-1]),
        max_query_len=max(q_lens), max_seq_len=max(lens),
        query_start_loc_cpu=qsl if host else None, seq_lens_cpu=lens if host else None)


def test_plan_split_runs_and_long_sequences():
    meta = _meta([1, 1, 2000, 5, 7, 1500, 3], [9, 9, 100, 0, 4, 0, 8], num_decodes=2)
    plan = plan_split(meta, 2, min_query_len=1024)
    assert plan.long == ((2, 2, 2002, 100), (5, 2014, 3514, 0))
    assert plan.runs == ((3, 5, 7), (6, 7, 3))
    assert plan_split(meta, 2, min_query_len=4096).long == ()
    assert plan_split(meta, 2, min_query_len=4096).runs == ((2, 7, 2000),)
    with pytest.raises(ValueError, match="host lists"):
        plan_split(_meta([2000], [0], 0, host=False), 0)


def _attend(q, k, v, scale):
    """fp32 attention [n, H, D] over keys [L, H, D]: (o, lse [H, n])."""
    s = torch.einsum("qhd,lhd->hql", q, k) * scale
    return torch.einsum("hql,lhd->qhd", s.softmax(-1), v), s.logsumexp(-1)


def test_merge_attn_states_equals_attention_over_all_keys():
    torch.manual_seed(0)
    n, L1, L2, H, D = 7, 11, 5, 3, 16
    q = torch.randn(n, H, D)
    k, v = torch.randn(L1 + L2, H, D), torch.randn(L1 + L2, H, D)
    full, lse_full = _attend(q, k, v, 0.25)
    o1, lse1 = _attend(q, k[:L1], v[:L1], 0.25)
    o2, lse2 = _attend(q, k[L1:], v[L1:], 0.25)
    o, lse = merge_attn_states(o1, lse1, o2, lse2)
    torch.testing.assert_close(o, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_full, atol=1e-5, rtol=1e-5)
    empty = torch.full_like(lse1, float("-inf"))  # a partial that saw no key drops out
    o, lse = merge_attn_states(torch.zeros_like(o1), empty, o2, lse2)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(lse, lse2)


def test_prefill_attention_knob_is_validated():
    from miniinfer.config import EngineConfig

    assert EngineConfig(device="cpu").prefill_attention == "auto"
    assert EngineConfig(device="cpu", prefill_attention="triton").prefill_attention == "triton"
    with pytest.raises(ValueError, match="prefill_attention"):
        EngineConfig(device="cpu", prefill_attention="sdpa")
