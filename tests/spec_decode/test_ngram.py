"""Prompt-lookup drafting: the continuation of the most recent earlier occurrence of the
longest recurring suffix n-gram."""
from miniinfer.spec_decode.ngram import NgramProposer


def test_longest_ngram_most_recent_occurrence():
    p = NgramProposer(min_n=1, max_n=3, num_speculative_tokens=3)
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 9, 2, 5, 6]
    # suffix (5, 6) occurs at 0 and 4 (3-gram (2, 5, 6) does not recur): most recent = 4 -> 9, 2, 5
    assert p.propose(tokens) == [9, 2, 5]
    tokens = [1, 2, 3, 4, 9, 2, 3, 8, 1, 2, 3]
    # 3-gram (1, 2, 3) recurs at 0 -> 4, 9, 2 (beats the more recent 2-gram (2, 3) at 5)
    assert p.propose(tokens) == [4, 9, 2]


def test_k_limits_and_no_match():
    p = NgramProposer(min_n=2, max_n=4, num_speculative_tokens=5)
    assert p.propose([1, 2, 3, 4]) == []  # nothing recurs
    assert p.propose([1, 2, 3, 1, 2], k=1) == [3]
    assert p.propose([1, 2, 1, 2]) == [1, 2]  # the continuation stops at the end of the context
    assert p.propose([7]) == []
    assert p.propose([1, 2, 3, 1, 2], k=0) == []
