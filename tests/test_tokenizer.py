"""Tokenizer helpers on the embedded SmolLM2 GGUF (tokenizer read from GGUF metadata)."""
from __future__ import annotations

import os

import pytest

from miniinfer.loader.embedded import embedded_model_path
from miniinfer.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(embedded_model_path())


@pytest.fixture(scope="module")
def hf_folder(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol_tok")
    tok.save_pretrained(folder)
    return str(folder)


def test_round_trip(tok):
    text = "Hello world! Ünïcödé, tabs\tand\nnewlines — 123."
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 49152 or len(tok) == 49152


def test_special_tokens(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.eos_token_id == 2


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = apply_chat_template(tok, msgs)
    assert isinstance(prompt, str)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt
    assert "<|im_start|>user\nHi there<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    no_gen = apply_chat_template(tok, msgs, add_generation_prompt=False)
    assert "<|im_start|>assistant" not in no_gen and prompt.startswith(no_gen)


def test_chat_template_default_system(tok):
    prompt = apply_chat_template(tok, [{"role": "user", "content": "x"}])
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template injects one
    assert "<|im_start|>assistant" in prompt


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ("hello", "list"),
    (["hello"], r"messages\[0\]"),
    ([{"content": "x"}], r"messages\[0\].*'role'"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "x"}], r"messages\[1\]\['role'\]"),
    ([{"role": "user"}], r"messages\[0\].*'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\]"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\]"),
])
def test_chat_template_malformed(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(tok, messages)


def test_chat_template_missing():
    class NoTemplate:
        chat_template = None
        name_or_path = "plain-model"

    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(NoTemplate(), [{"role": "user", "content": "hi"}])


def test_eos_token_ids(tok):
    ids = eos_token_ids(tok, {"eos_token_id": 2})
    assert 2 in ids and ids[0] == 2
    assert 0 in ids  # <|endoftext|> is in the vocabulary of this chat model
    assert len(ids) == len(set(ids))
    # config ids come first and lists are accepted
    assert eos_token_ids(tok, {"eos_token_id": [7, 2]})[:2] == [7, 2]
    assert 2 in eos_token_ids(tok, {})


def test_eos_token_ids_non_chat():
    class Plain:
        chat_template = None
        eos_token_id = 5

        def get_vocab(self):
            return {"<|im_end|>": 9}

    assert eos_token_ids(Plain(), {"eos_token_id": 3}) == [3, 5]


def test_hf_folder(tok, hf_folder):
    t2 = load_tokenizer(hf_folder)
    text = "The quick brown fox."
    assert t2(text).input_ids == tok(text).input_ids
    assert "<|im_start|>assistant" in apply_chat_template(t2, [{"role": "user", "content": "q"}])


def test_gguf_file_argument(tmp_path, hf_folder):
    # a folder plus gguf_file= (the GGUF is only parsed for its tokenizer; use a symlink)
    src = embedded_model_path()
    os.symlink(src, tmp_path / "model.gguf")
    t = load_tokenizer(str(tmp_path), gguf_file="model.gguf")
    assert t.convert_tokens_to_ids("<|im_end|>") == 2
    with pytest.raises(ValueError, match="nope.gguf"):
        load_tokenizer(str(tmp_path), gguf_file="nope.gguf")


def test_unknown_paths(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="does-not-exist"):
        load_tokenizer(missing)
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        load_tokenizer(str(txt))
