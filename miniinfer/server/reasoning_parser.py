"""Split a reasoning model's output into ``reasoning_content`` and ``content``.

The markers come from ``miniinfer.reasoning`` (``--reasoning-parser qwen3 | deepseek_r1``:
``<think>`` / ``</think>``). The rules, one state machine for streaming and non-streaming
(:func:`split_reasoning` feeds the whole text to a :class:`ReasoningStreamer`, so the two
always agree):

* the output starts in the thinking: Qwen3's template may already have written ``<think>``
  into the prompt, so the start marker is optional; its first occurrence before the end
  marker is dropped;
* everything before the first end marker is ``reasoning_content``, everything after it is
  ``content`` (markers removed, text otherwise untouched);
* no end marker at all: the whole output is ``reasoning_content`` (vLLM's Qwen3 / DeepSeek-R1
  behaviour: the model was cut off, or is still, thinking);
* a request whose template closed the thinking itself (``chat_template_kwargs``
  ``{"enable_thinking": false}``) is not split: the server does not build a parser for it.

While streaming, text that may be the beginning of a marker is held back until the next
delta (or the end) tells.
"""
from __future__ import annotations

from typing import Optional

from miniinfer.reasoning import reasoning_markers


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningStreamer:
    """Incremental splitter: :meth:`feed` text deltas, then :meth:`finish` once.

    Each call returns ``(reasoning_delta, content_delta)``; an empty string means nothing new."""

    def __init__(self, start: str, end: str) -> None:
        self.start = start
        self.end = end
        self.in_reasoning = True
        self.start_seen = False
        self._buf = ""  # held back text (possibly the beginning of a marker)

    def feed(self, delta: str) -> tuple[str, str]:
        """Process a text delta."""
        if not self.in_reasoning:
            return "", delta
        self._buf += delta
        reasoning: list[str] = []
        content = ""
        while self.in_reasoning:
            s = -1 if self.start_seen else self._buf.find(self.start)
            e = self._buf.find(self.end)
            if s >= 0 and (e < 0 or s < e):
                reasoning.append(self._buf[:s])
                self._buf = self._buf[s + len(self.start):]
                self.start_seen = True
            elif e >= 0:
                reasoning.append(self._buf[:e])
                content, self._buf = self._buf[e + len(self.end):], ""
                self.in_reasoning = False
            else:
                keep = partial_marker_len(self._buf, self.end)
                if not self.start_seen:
                    keep = max(keep, partial_marker_len(self._buf, self.start))
                cut = len(self._buf) - keep
                reasoning.append(self._buf[:cut])
                self._buf = self._buf[cut:]
                break
        return "".join(reasoning), content

    def finish(self) -> tuple[str, str]:
        """The output ended: what was held back is thinking (no end marker came)."""
        rest, self._buf = self._buf, ""
        return (rest, "") if self.in_reasoning else ("", rest)


def make_reasoning_streamer(parser: str) -> ReasoningStreamer:
    """A streamer with the markers of ``parser`` (``ValueError`` for an unknown name)."""
    start, end = reasoning_markers(parser)
    return ReasoningStreamer(start, end)


def split_reasoning(text: str, parser: str) -> tuple[Optional[str], Optional[str]]:
    """``(reasoning_content, content)`` of a whole output; an empty part is ``None``."""
    streamer = make_reasoning_streamer(parser)
    r1, c1 = streamer.feed(text)
    r2, c2 = streamer.finish()
    return (r1 + r2) or None, (c1 + c2) or None


def thinking_disabled(chat_template_kwargs: Optional[dict]) -> bool:
    """Whether the request switched the thinking off in the template (Qwen3's
    ``enable_thinking`` / ``thinking`` set to false): then nothing is reasoning."""
    kw = chat_template_kwargs or {}
    return kw.get("enable_thinking") is False or kw.get("thinking") is False
