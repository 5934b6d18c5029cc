"""Stop-string handling for generation.

Text grows by a few characters per step; :meth:`StopChecker.check` only looks
at the region where a *new* match can be (the new characters plus
``len(stop) - 1`` characters before them), so each step is O(new text).
:meth:`StopChecker.streamable_len` tells how much text can be streamed without
ever streaming (and then having to retract) the start of a stop string.

Which match wins when several are found in one step: the one that *ends*
first (ties: the longer one, i.e. the one starting earlier).  That is the
match a character-by-character stream would hit first, so the result does not
depend on how the text was split into steps.
"""

from __future__ import annotations

from typing import Iterable


class StopChecker:
    def __init__(self, stop: Iterable[str] | str | None = None,
                 include_stop_str_in_output: bool = False):
        if isinstance(stop, str):
            stop = [stop]
        # Keep order, drop duplicates and empty strings (an empty stop string
        # would match everywhere; it is treated as no stop string).
        self.stop: list[str] = [s for s in dict.fromkeys(stop or ()) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        # Every non-empty prefix of every stop string (full strings included),
        # for streamable_len.
        self._prefixes = {s[:k] for s in self.stop for k in range(1, len(s) + 1)}
        self._first_chars = {s[0] for s in self.stop}

    def __bool__(self) -> bool:
        return bool(self.stop)

    def check(self, text: str, num_new_chars: int) -> tuple[str | None, int]:
        """After ``text`` grew by ``num_new_chars``: return (matched stop string
        or None, length to truncate ``text`` to).

        Only matches that end inside the new characters are looked for (older
        ones were found by earlier calls).  On a match the length cuts ``text``
        just before the stop string, or just after it when
        ``include_stop_str_in_output``; without a match it is ``len(text)``.
        """
        n = len(text)
        if not self.stop or num_new_chars <= 0:
            return None, n
        new_start = n - min(num_new_chars, n)
        best: str | None = None
        best_start = best_end = 0
        for s in self.stop:
            i = text.find(s, max(0, new_start - len(s) + 1))
            if i < 0:
                continue
            end = i + len(s)
            if best is None or end < best_end or (end == best_end and i < best_start):
                best, best_start, best_end = s, i, end
        if best is None:
            return None, n
        return best, (best_end if self.include_stop_str_in_output else best_start)

    def streamable_len(self, text: str) -> int:
        """How much of ``text`` is safe to stream now: everything except the
        longest tail that is the beginning of some stop string (that tail may
        still turn into a stop string, which must never be streamed)."""
        n = len(text)
        if not self.stop or n == 0:
            return n
        prefixes = self._prefixes
        first = self._first_chars
        for k in range(min(self.max_stop_len, n), 0, -1):
            if text[n - k] in first and text[n - k:] in prefixes:
                return n - k
        return n
