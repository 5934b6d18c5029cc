"""The paged layout helpers of attention/metadata.py: host and device forms agree."""
from __future__ import annotations

import random

import torch

from miniinfer.attention.metadata import cache_slot, cache_slots, context_slots


def test_cache_slots_equal_per_token_slots():
    rng = random.Random(0)
    for _ in range(500):
        table = [rng.randrange(100) for _ in range(20)]
        start = rng.randrange(300)
        end = rng.randrange(start, 320)
        assert cache_slots(table, start, end, 16) == [cache_slot(table, p, 16) for p in range(start, end)]


def test_context_slots_match_host_slots():
    tables = [[5, 2, 9], [1, 0, 7]]
    got = context_slots(torch.tensor(tables, dtype=torch.int32), 40, 16)
    assert got.dtype == torch.int64 and got.shape == (2, 40)
    assert got.tolist() == [cache_slots(t, 0, 40, 16) for t in tables]
