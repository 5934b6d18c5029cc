"""N-gram drafting (prompt lookup decoding): the tokens that followed the most recent earlier
occurrence of the sequence's last n tokens, for n from ``prompt_lookup_max`` down to
``prompt_lookup_min``. Free to compute, strong on code, extraction and repetitive text.

Reference: Saxena, "Prompt Lookup Decoding" (2023); vLLM's ``ngram`` speculative method.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAX_LOOKBACK = 8192  # only the last tokens are searched: O(lookback * n) per proposal


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, num_speculative_tokens: int):
        self.min_n, self.max_n, self.k = min_n, max_n, num_speculative_tokens

    def propose(self, token_ids: list[int], k: int | None = None) -> list[int]:
        """Up to ``k`` (default ``num_speculative_tokens``) draft tokens continuing
        ``token_ids`` (prompt + output, all known), or [] when no n-gram recurs."""
        k = self.k if k is None else k
        if k <= 0 or len(token_ids) < self.min_n + 1:
            return []
        ctx = np.asarray(token_ids[-MAX_LOOKBACK:], dtype=np.int64)
        n_ctx = len(ctx)
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            windows = sliding_window_view(ctx[:-1], n)  # every earlier n-gram, by start
            hits = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # the most recent occurrence's continuation
                return ctx[start:start + k].tolist()
        return []
