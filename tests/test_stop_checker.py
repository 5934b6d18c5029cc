"""Tests for miniinfer.stop_checker.StopChecker."""

from __future__ import annotations

import random

import pytest

from miniinfer.stop_checker import StopChecker


def reference(text: str, stops: list[str], include: bool) -> tuple[str | None, int]:
    """Brute force over the whole text: the match that ends first wins, ties
    go to the longer one."""
    best = None
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            best = (s, end if include else end - len(s))
            break
    return best if best else (None, len(text))


def stream(checker: StopChecker, text: str, chunks: list[int]):
    """Feed text in chunks like a generation loop; return (stop, final text).
    While running, only streamable_len(...) characters are streamed; checks
    that they never have to be taken back."""
    cur = ""
    sent = ""
    pos = 0
    for n in chunks:
        piece = text[pos:pos + n]
        pos += n
        cur += piece
        stop, length = checker.check(cur, len(piece))
        if stop is not None:
            cur = cur[:length]
            assert cur.startswith(sent), "streamed text had to be retracted"
            return stop, cur
        safe = checker.streamable_len(cur)
        assert safe >= len(sent)  # the held-back tail never grows backwards
        sent = cur[:safe]
        for s in checker.stop:  # never streamed the start of a stop string
            assert s not in sent
    return None, cur


def chunkings(n: int, rng: random.Random):
    yield [1] * n
    yield [n] if n else []
    for _ in range(5):
        out, left = [], n
        while left > 0:
            k = rng.randint(1, 4)
            out.append(min(k, left))
            left -= k
        yield out


def test_empty_stop_list_is_noop():
    c = StopChecker([])
    assert not c
    assert c.check("anything at all", 5) == (None, 15)
    assert c.streamable_len("abc") == 3
    assert StopChecker(None).check("x", 1) == (None, 1)
    assert StopChecker([""]).check("abc", 3) == (None, 3)  # empty stop string ignored


def test_basic_match_and_truncation():
    c = StopChecker(["STOP"])
    assert c.check("hello STOP world", 16) == ("STOP", 6)
    c = StopChecker(["STOP"], include_stop_str_in_output=True)
    assert c.check("hello STOP world", 16) == ("STOP", 10)
    assert StopChecker("\n\n").check("a\n\nb", 4) == ("\n\n", 1)


def test_spanning_token_boundaries():
    c = StopChecker(["</answer>"])
    text = ""
    for piece in ["The answer is 4", "</an", "sw", "er> trailing"]:
        text += piece
        stop, n = c.check(text, len(piece))
    assert (stop, n) == ("</answer>", len("The answer is 4"))


def test_search_region_only_new_text():
    c = StopChecker(["ab"])
    # an old match (before the region) is not reported again
    assert c.check("ab" + "x" * 10, 3) == (None, 12)
    # a match ending inside the new chars is found even if it starts earlier
    assert c.check("xxxa" + "b", 1) == ("ab", 3)
    # num_new_chars larger than the text is fine
    assert c.check("ab", 10) == ("ab", 0)
    assert c.check("ab", 0) == (None, 2)


def test_multiple_stops_earliest_wins():
    c = StopChecker(["world", "lo"])
    assert c.check("hello world", 11) == ("lo", 3)
    c = StopChecker(["lo", "hello"])  # both end at 5: the longer one wins
    assert c.check("hello world", 11) == ("hello", 0)
    c = StopChecker(["abcd", "bc"])  # "bc" completes first
    assert c.check("xabcd", 5) == ("bc", 2)
    c = StopChecker(["abcd", "bc"], include_stop_str_in_output=True)
    assert c.check("xabcd", 5) == ("bc", 4)


def test_stop_that_is_prefix_of_another():
    c = StopChecker(["<|end|>", "<|end"])
    assert c.check("hi <|end|>", 10) == ("<|end", 3)
    c = StopChecker(["ab", "abc"], include_stop_str_in_output=True)
    assert c.check("zabc", 4) == ("ab", 3)


def test_streamable_len_holds_back_partial_stop():
    c = StopChecker(["</s>", "STOP"])
    assert c.streamable_len("hello") == 5
    assert c.streamable_len("hello <") == 6
    assert c.streamable_len("hello </") == 6
    assert c.streamable_len("hello </s") == 6
    assert c.streamable_len("hello ST") == 6
    assert c.streamable_len("hello S!") == 8
    assert c.streamable_len("") == 0
    # the longest tail that could still become a stop string is held
    c = StopChecker(["aab"])
    assert c.streamable_len("xaa") == 1
    assert c.streamable_len("xaaa") == 2


def test_unicode_stops():
    c = StopChecker(["。", "🙂🙃"])
    assert c.check("你好。再见", 5) == ("。", 2)
    assert c.streamable_len("hi 🙂") == 3
    assert c.check("hi 🙂🙃 x", 2) == (None, 7)  # match ended before the new chars
    assert c.check("hi 🙂🙃 x", 3) == ("🙂🙃", 3)


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_match_reference(include):
    """Whatever the chunking: same stop and length as a brute-force search
    over the whole text, and nothing streamed is ever retracted."""
    rng = random.Random(0)
    alphabet = "ab c\n"
    for _ in range(300):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ref_stop, ref_len = reference(text, stops, include)
        for chunks in chunkings(len(text), rng):
            checker = StopChecker(stops, include_stop_str_in_output=include)
            stop, final = stream(checker, text, chunks)
            assert stop == ref_stop, (stops, text, chunks)
            assert len(final) == ref_len, (stops, text, chunks)
