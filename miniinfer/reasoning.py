"""Reasoning models: the markers around the model's thinking, per ``--reasoning-parser``.

Qwen3 (and DeepSeek-R1-style models) write ``<think> ... </think>`` before the answer. The
server splits that part off as ``reasoning_content``; the engine keeps a request's grammar
dormant until the end marker was generated, so a schema never constrains the thinking.
"""
from __future__ import annotations

REASONING_MARKERS: dict[str, tuple[str, str]] = {
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
}


def reasoning_markers(parser: str) -> tuple[str, str]:
    """(start, end) marker strings of a reasoning parser. Raises ``ValueError`` listing the
    known parsers for an unknown name."""
    if parser not in REASONING_MARKERS:
        raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_MARKERS)}, got {parser!r}")
    return REASONING_MARKERS[parser]


def reasoning_ended(prompt_ids: list[int], start_ids: list[int], end_ids: list[int]) -> bool:
    """Whether the prompt already closed the thinking (e.g. Qwen3's ``enable_thinking=False``
    template writes an empty ``<think>\\n\\n</think>``): the end marker occurs after the last
    start marker. Without a start marker the model is expected to think first."""
    def last(seq: list[int]) -> int:
        n = len(seq)
        for i in range(len(prompt_ids) - n, -1, -1):
            if prompt_ids[i:i + n] == seq:
                return i
        return -1
    start = last(start_ids)
    return start >= 0 and last(end_ids) > start
