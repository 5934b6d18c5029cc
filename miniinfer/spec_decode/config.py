"""``SpeculativeConfig``: which drafter, how many tokens, when to stand down (vLLM's names)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model", "eagle")
MAX_SPECULATIVE_TOKENS = 15  # a chain's verify rows per sequence (1 + drafts) fit one 16-row LM-head call
MAX_TREE_NODES = 63  # a tree's verify: 1 + nodes rows, within the attention's 64-key tree window
DEFAULT_TREE_NODES = 8


@dataclass
class SpeculativeConfig:
    """``LLM(speculative_config={...})`` / ``serve --speculative-config JSON``.

    ``method``: ``ngram`` (prompt lookup over the request's own tokens), ``draft_model`` (a
    smaller model sharing the tokenizer; ``model`` = its path) or ``eagle`` (an EAGLE head).
    ``num_speculative_tokens``: draft tokens verified per step (1 ... 15).
    ``prompt_lookup_min`` / ``prompt_lookup_max``: the n-gram sizes tried, longest first.
    ``disable_by_batch_size``: no drafts while more sequences than this run (large batches are
    compute-bound: verifying drafts there costs more than it saves); None: always draft.
    ``eagle_topk`` (EAGLE only): branches kept per depth of an EAGLE-2 dynamic tree, whose depth
    is ``num_speculative_tokens``; 1 drafts a chain. ``num_draft_tokens``: tree nodes verified
    per step (the best by cumulative draft probability; default 8 for a tree; 1 ... 63), for a
    chain its length (default and at most ``num_speculative_tokens``).
    """
    method: str = "ngram"
    num_speculative_tokens: int = 4
    model: str | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = None
    eagle_topk: int = 1
    num_draft_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: "dict | SpeculativeConfig") -> "SpeculativeConfig":
        """Raises ``ValueError`` naming an unknown key or an out-of-range value."""
        if isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "eagle_topk",
                     "num_draft_tokens", "disable_by_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"speculative_config.{name} must be an integer, got {value!r}")
        k = self.num_speculative_tokens
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {k!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        self._validate_model()
        self._validate_tree()
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"speculative_config.disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")

    def _validate_model(self) -> None:
        """``model``: required by draft_model, optional for eagle (a head file), unused by ngram;
        a local path that exists (no model hub)."""
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model (the draft model's path) is required for draft_model")
        if self.model is None:
            return
        if self.method == "ngram":
            raise ValueError("speculative_config.model is not used by method 'ngram' (prompt lookup has no model)")
        what = "the draft model" if self.method == "draft_model" else "the EAGLE head file"
        if not isinstance(self.model, str) or not os.path.exists(self.model):
            raise ValueError(f"speculative_config.model ({what}): {self.model!r} does not exist")
        if self.method == "eagle" and not os.path.isfile(self.model):
            raise ValueError(f"speculative_config.model ({what}) must be a .safetensors file, got the folder "
                             f"{self.model!r}")

    def _validate_tree(self) -> None:
        topk, k, n = self.eagle_topk, self.num_speculative_tokens, self.num_draft_tokens
        if not 1 <= topk <= 16:
            raise ValueError(f"speculative_config.eagle_topk must be in [1, 16], got {topk!r}")
        if topk > 1 and self.method != "eagle":
            raise ValueError(f"speculative_config.eagle_topk > 1 (a draft tree) needs method 'eagle', got {self.method!r}")
        if topk > 1 and (k - 1) * topk > 64:
            raise ValueError("speculative_config: (num_speculative_tokens - 1) * eagle_topk must be <= 64 "
                             f"(the head's tree window), got ({k} - 1) * {topk}")
        limit = MAX_TREE_NODES if topk > 1 else k
        if n is not None and not 1 <= n <= limit:
            raise ValueError(f"speculative_config.num_draft_tokens must be in [1, {limit}] "
                             f"({'tree nodes' if topk > 1 else 'a chain: at most num_speculative_tokens'}), got {n!r}")

    @property
    def max_draft_tokens(self) -> int:
        """Drafts one sequence verifies per step at most (tree nodes, or the chain's length)."""
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        return DEFAULT_TREE_NODES if self.eagle_topk > 1 else self.num_speculative_tokens
