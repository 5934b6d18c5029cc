"""The synthetic warm-up steps (``worker/warmup.py``) fit the engine they warm up."""
from __future__ import annotations

import pytest
import torch

from miniinfer.worker.warmup import warmup_schedules


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3, 256])
def test_no_warmup_step_has_more_sequences_than_the_engine(max_num_seqs):
    """The runner's sampled-ids buffers hold ``max_num_seqs`` rows: a warm-up step with more
    sampling sequences broke the start of a GPU engine with ``max_num_seqs=1``."""
    scheds = warmup_schedules(16, 4096, 4096, torch.device("cpu"), max_num_seqs)
    assert scheds and all(len(s.scheduled) <= max_num_seqs for s in scheds)
    assert max(len(s.scheduled) for s in scheds) == min(max_num_seqs, 5)  # the largest plan, cut to fit
    for s in scheds:
        assert [x.num_new_tokens == 1 for x in s.scheduled] == sorted((x.num_new_tokens == 1 for x in s.scheduled),
                                                                       reverse=True)  # decodes first
