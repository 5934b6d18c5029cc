"""Build a stand-in for Qwen2's tokenizer, for benchmarks on machines without a model hub.

    python benchmarks/make_bench_tokenizer.py OUT_DIR [--vocab-size 151643] [--max-corpus-mb 160]

Prefer ``benchmarks/qwen2_vocab_tokenizer.py`` (Qwen2's real vocabulary, from llama.cpp's
``ggml-vocab-qwen2.gguf``): with this stand-in xgrammar's per-row mask fill on the §10 schema
costs ~6x more (2-core CPU: ~88 vs ~15 µs a row). This one stays as the fallback when that
GGUF (the ``llama_cpp_python`` sdist on PyPI) cannot be had.

Why: the §10 structured-output benchmark (``benchmarks/structured_output_bench.py``) runs
Qwen2-0.5B / Qwen2-7B with dummy weights on a GPU machine that has no network and no copy of
Qwen2's tokenizer. The cost of a grammar mask (xgrammar's token-mask cache, the per-step
``[B, ceil(V / 32)]`` bitmask fill) depends on the vocabulary: its size and the kind of tokens
in it. So this script trains a tokenizer **of Qwen2's size and kind** — a byte-level BPE
(``tokenizers``: ByteLevel pre-tokenizer and decoder, ``BpeTrainer`` over the 256-byte alphabet)
with 151,643 regular tokens followed by Qwen2's special tokens ``<|endoftext|>`` (151643),
``<|im_start|>`` (151644) and ``<|im_end|>`` (151645), and a ChatML chat template. It is not
Qwen2's tokenizer (different merges, GPT-2's pre-tokenizer regex rather than Qwen2's), only a
stand-in with the same vocabulary size, id layout and byte-level-BPE structure; the model's
padded embedding size (151,936) is what xgrammar is told (``TokenizerInfo(vocab_size=151936)``).

Training text: the ``.py`` / ``.pyi`` / ``.md`` / ``.rst`` / ``.txt`` files of the Python
standard library and of the interpreter's site-packages, read in sorted order (deterministic)
until ``--max-corpus-mb`` MB — enough distinct words to reach the vocabulary size, small enough
to train in a few minutes on two cores. The folder written (``tokenizer.json`` +
``tokenizer_config.json`` + ``special_tokens_map.json``) loads with
``transformers.AutoTokenizer.from_pretrained(OUT_DIR)``; the script checks that, and that
xgrammar accepts it, before it returns.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)  # Qwen2-Instruct's template
EXTENSIONS = (".py", ".pyi", ".md", ".rst", ".txt")
MODEL_VOCAB_SIZE = 151936  # Qwen2's padded embedding size


def corpus_files(max_bytes: int) -> list[str]:
    """Text files of the stdlib and site-packages, sorted, up to ``max_bytes`` in total."""
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    files, total = [], 0
    for root in dict.fromkeys(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if os.path.basename(dirpath) == "site-packages" and dirpath != root:
                dirnames.clear()  # the stdlib walk must not wander into a venv's site-packages
                continue
            for name in sorted(filenames):
                if not name.endswith(EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                if size > 4 << 20:  # huge generated files (tables) add little variety
                    continue
                files.append(path)
                total += size
                if total >= max_bytes:
                    return files
    return files


def train(out_dir: str, vocab_size: int, max_corpus_mb: float) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, AddedToken

    t0 = time.perf_counter()
    files = corpus_files(int(max_corpus_mb * 1e6))
    corpus_bytes = sum(os.path.getsize(f) for f in files)
    print(f"corpus: {len(files)} files, {corpus_bytes / 1e6:.1f} MB", flush=True)

    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, so no unk token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])

    def lines():
        for path in files:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield f.read()
            except OSError:
                continue

    t_train = time.perf_counter()
    tok.train_from_iterator(lines(), trainer=trainer, length=len(files))
    train_s = time.perf_counter() - t_train
    regular = tok.get_vocab_size()
    # Qwen2's layout: the special tokens right after the regular ones (151643, 151644, 151645)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",  # Qwen2-Instruct's
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHATML_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, f, indent=2)
    stats = {"regular_tokens": regular, "vocab_size": tok.get_vocab_size(),
             "special_token_ids": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
             "corpus_files": len(files), "corpus_mb": round(corpus_bytes / 1e6, 1),
             "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(out_dir, "bench_tokenizer_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def check(out_dir: str) -> dict:
    """Load the folder the way the engine does (transformers + xgrammar); returns a few facts."""
    import transformers
    import xgrammar as xgr
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    text = 'def f(x):\n    return {"name": "Ünïcode ✓", "n": 42}\n'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text, "byte-level round trip failed"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n"), chat
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=MODEL_VOCAB_SIZE)
    return {"len_tokenizer": len(tok), "eos_token_id": tok.eos_token_id, "xgrammar_vocab_size": info.vocab_size,
            "xgrammar_vocab_type": str(info.vocab_type), "xgrammar_stop_token_ids": list(info.stop_token_ids),
            "sample_tokens": len(ids), "sample_chars": len(text)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--vocab-size", type=int, default=151643, help="regular (non-special) tokens; Qwen2: 151643")
    ap.add_argument("--max-corpus-mb", type=float, default=160.0, help="cap of the training text")
    ap.add_argument("--check-only", action="store_true", help="only load an existing folder and check it")
    args = ap.parse_args(argv)
    if not args.check_only:
        stats = train(args.out_dir, args.vocab_size, args.max_corpus_mb)
        print(json.dumps(stats, indent=2))
        if stats["regular_tokens"] < args.vocab_size:
            print(f"warning: the corpus gave only {stats['regular_tokens']} tokens (asked {args.vocab_size}); "
                  "raise --max-corpus-mb", file=sys.stderr)
    print(json.dumps(check(args.out_dir), indent=2))


if __name__ == "__main__":
    main()
