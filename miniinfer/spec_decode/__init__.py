"""Speculative decoding: drafters propose tokens, the target verifies them in one forward and
the rejection sampler keeps what the target's distribution allows (lossless).

``make_proposer`` builds the drafter of a ``SpeculativeConfig``; the engine calls its
``propose_for`` before scheduling and ``record`` after each verify.
"""
from __future__ import annotations

from miniinfer.spec_decode.config import SpeculativeConfig
from miniinfer.spec_decode.proposer import NgramDrafter, Proposer


def make_proposer(config: SpeculativeConfig, engine) -> Proposer:
    """Raises ``ValueError`` for a method this build can't run."""
    if config.method == "ngram":
        return NgramDrafter(config, engine.max_model_len)
    if config.method == "draft_model":
        from miniinfer.spec_decode.draft_model import DraftModelDrafter
        return DraftModelDrafter(config, engine)
    if config.method == "eagle":
        from miniinfer.spec_decode.eagle import EagleDrafter
        return EagleDrafter(config, engine)
    raise ValueError(f"speculative_config.method {config.method!r} is not available yet")


__all__ = ["SpeculativeConfig", "make_proposer", "Proposer"]
