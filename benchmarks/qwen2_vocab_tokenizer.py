"""Build an HF tokenizer folder with Qwen2's real vocabulary from llama.cpp's ``ggml-vocab-qwen2.gguf``.

    python benchmarks/qwen2_vocab_tokenizer.py OUT_DIR [--gguf PATH]

Why: the §10 structured-output benchmark (``benchmarks/structured_output_bench.py``) needs a
Qwen2 tokenizer on machines that reach no model hub. The stand-in of
``benchmarks/make_bench_tokenizer.py`` has Qwen2's size and id layout but its own merges, and
xgrammar's per-row mask fill costs ~6x more with it than with Qwen2's vocabulary (its token-mask
cache splits the vocabulary into context-independent / -dependent tokens, and the stand-in's
tokens land far more often in the expensive class). llama.cpp ships Qwen2's vocabulary (tokens,
merges, token types, specials, chat template; no weights) as ``models/ggml-vocab-qwen2.gguf``,
5.9 MB, inside the PyPI sdist of ``llama_cpp_python`` (``vendor/llama.cpp/models/``).

What it does:

1. The GGUF: ``--gguf PATH``, else a copy already extracted under ``/tmp/llsrc``, else
   ``pip download --no-deps --no-binary :all: llama_cpp_python==0.3.36`` (the sdist, 77 MB)
   into a temporary folder, and only ``ggml-vocab-qwen2.gguf`` (+ llama.cpp's ``.inp`` / ``.out``
   tokenization test pairs next to it) is read out of the tarball.
2. transformers' own GGUF tokenizer conversion (``AutoTokenizer.from_pretrained(dir,
   gguf_file=...)``, needs the ``gguf`` package) and ``save_pretrained(OUT_DIR)``.
3. Two fixes to the saved ``tokenizer.json``: llama.cpp padded the vocabulary to the model's
   151,936 rows with 290 user-defined tokens ``[PAD151646]`` ... ``[PAD151935]``, which
   transformers turns into ordinary (non-special) added tokens — xgrammar would then allow the
   text ``[PAD151700]`` inside a JSON string. They are dropped, as in Qwen2's own
   ``tokenizer.json`` (151,643 BPE tokens + ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
   ``<|im_end|>`` 151645; ``len(tokenizer)`` 151,646 < the configs' padded ``vocab_size``
   151,936, which is what xgrammar is told). And Qwen2's NFC normalizer, which the GGUF does
   not record, is put back. ``model_max_length`` is set to 32768.
4. Checks: the folder loads with ``AutoTokenizer.from_pretrained(OUT_DIR)`` (only transformers
   + tokenizers needed from then on), the special-token ids and eos (``<|endoftext|>`` 151643,
   the GGUF's and the Qwen2 configs' ``eos_token_id``), round trips (ASCII, accents, CJK,
   emoji), llama.cpp's own test pairs for this vocabulary (``.inp`` / ``.out``, when present:
   all must match), the ChatML template, and ``xgrammar.TokenizerInfo`` (byte-level, stop ids).
   Facts go to ``bench_tokenizer_stats.json`` (the §10 result file copies it).

The folder is ~11 MB (``tokenizer.json``), small enough to carry to the GPU machine with
``.vllm`` (``run(carry=[".whl", ".vllm"], ...)``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata

SDIST = "llama_cpp_python==0.3.36"
GGUF_NAME = "ggml-vocab-qwen2.gguf"
MEMBER_DIR = "vendor/llama.cpp/models/"
LOCAL_GLOBS = ("/tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp/models/" + GGUF_NAME,)
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
MODEL_VOCAB_SIZE = 151936  # Qwen2's padded embedding size (.vllm/configs/Qwen2-*/config.json)
PAD_RE = re.compile(r"^\[PAD\d+\]$")
ROUND_TRIPS = [
    "Hello world",
    'def f(x):\n    return {"name": "Ünïcode ✓", "n": 42}\n',
    "Äpfel, Straße, naïve café — ½ €",
    "нещо на Български; 北京的天气很好；東京タワー",
    "emoji 🦙🚀 and tabs\tand\n\nnew lines   ",
]


def find_gguf(path: str | None, workdir: str) -> str:
    """The GGUF path: given, extracted already, or downloaded (sdist) and extracted into ``workdir``."""
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"--gguf {path!r}: no such file")
        return path
    for pattern in LOCAL_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    print(f"downloading the {SDIST} sdist (pip) for {GGUF_NAME} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", workdir, SDIST], check=True)
    tarballs = glob.glob(os.path.join(workdir, "llama_cpp_python-*.tar.gz"))
    if not tarballs:
        raise SystemExit(f"pip download gave no sdist in {workdir}")
    return extract_from_sdist(tarballs[0], workdir)


def extract_from_sdist(tarball: str, workdir: str) -> str:
    """Read ``ggml-vocab-qwen2.gguf`` (+ its ``.inp`` / ``.out``) out of the sdist into ``workdir``."""
    out = None
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and m.name.endswith(MEMBER_DIR + base) and base.startswith(GGUF_NAME):
                dst = os.path.join(workdir, base)
                with tf.extractfile(m) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f)
                if base == GGUF_NAME:
                    out = dst
    if out is None:
        raise SystemExit(f"{tarball} has no {MEMBER_DIR}{GGUF_NAME}")
    return out


def convert(gguf_path: str, out_dir: str) -> dict:
    """transformers' GGUF conversion + save_pretrained, then drop the [PAD...] tokens and add NFC."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_len = len(tok)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)

    tj_path = os.path.join(out_dir, "tokenizer.json")
    with open(tj_path, encoding="utf-8") as f:
        tj = json.load(f)
    pads = {t["content"] for t in tj["added_tokens"] if PAD_RE.match(t["content"]) and not t["special"]}
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in pads]
    vocab = tj["model"]["vocab"]
    for p in pads:
        vocab.pop(p, None)
    if tj.get("normalizer") is None:
        tj["normalizer"] = {"type": "NFC"}  # Qwen2's tokenizer.json has it; llama.cpp's GGUF does not say
    with open(tj_path, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=None, separators=(",", ":"))

    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = 32768
    if isinstance(cfg.get("added_tokens_decoder"), dict):  # transformers 4.x writes one
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                       if v.get("content") not in pads}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return {"gguf": os.path.abspath(gguf_path), "gguf_tokens": gguf_len, "dropped_pad_tokens": len(pads),
            "bpe_tokens": len(vocab) - sum(1 for t in tj["added_tokens"] if t["content"] in vocab),
            "merges": len(tj["model"]["merges"])}


def llama_cpp_cases(gguf_path: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test pairs for this vocabulary (``.inp`` / ``.out`` next to the GGUF)."""
    inp, out = gguf_path + ".inp", gguf_path + ".out"
    if not (os.path.isfile(inp) and os.path.isfile(out)):
        return []
    with open(inp, encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(out, encoding="utf-8") as f:
        ids = [[int(x) for x in line.split()] for line in f.read().split("\n")]
    if texts and texts[-1] == "":
        texts.pop()
    return list(zip(texts, ids[:len(texts)]))


def check(out_dir: str, gguf_path: str | None = None, expect_specials: dict | None = SPECIALS,
          model_vocab_size: int = MODEL_VOCAB_SIZE) -> dict:
    """Load the folder the way the engine does (transformers + xgrammar) and check it."""
    import transformers
    import xgrammar as xgr

    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    if expect_specials:
        for t, i in expect_specials.items():
            assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
        assert len(tok) == max(expect_specials.values()) + 1, len(tok)
    assert tok.eos_token == "<|endoftext|>", tok.eos_token
    assert len(tok) <= model_vocab_size, (len(tok), model_vocab_size)
    assert not any(PAD_RE.match(t) for t in tok.get_added_vocab()), "[PAD] tokens left"
    for text in ROUND_TRIPS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), (text, ids, tok.decode(ids))
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>"), ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n"), chat
    cases = llama_cpp_cases(gguf_path) if gguf_path else []
    bad = [(t, want, got) for t, want in cases
           if (got := tok.encode(t, add_special_tokens=False)) != want]
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model_vocab_size)
    assert "BYTE_LEVEL" in str(info.vocab_type), info.vocab_type
    facts = {"len_tokenizer": len(tok), "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
             "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in (expect_specials or {})},
             "model_vocab_size": model_vocab_size, "xgrammar_vocab_size": info.vocab_size,
             "xgrammar_vocab_type": str(info.vocab_type), "xgrammar_stop_token_ids": list(info.stop_token_ids),
             "llama_cpp_test_cases": len(cases), "llama_cpp_test_mismatches": len(bad)}
    if bad:
        facts["llama_cpp_mismatch_examples"] = [{"text": t, "llama_cpp": w, "ours": g} for t, w, g in bad[:5]]
    return facts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="e.g. .vllm/bench_tokenizer_qwen2")
    ap.add_argument("--gguf", default=None, help=f"path of {GGUF_NAME} (default: /tmp/llsrc, else pip download {SDIST})")
    ap.add_argument("--check-only", action="store_true", help="only load an existing folder and check it")
    ap.add_argument("--no-expect-qwen2", action="store_true",
                    help="skip the Qwen2-specific id checks (tests with a small GGUF)")
    ap.add_argument("--model-vocab-size", type=int, default=MODEL_VOCAB_SIZE)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwen2_vocab_") as work:
        gguf_path = None if args.check_only and not args.gguf else find_gguf(args.gguf, work)
        stats: dict = {"source": f"llama.cpp {GGUF_NAME} ({SDIST} sdist)"}
        if not args.check_only:
            stats.update(convert(gguf_path, args.out_dir))
        stats.update(check(args.out_dir, gguf_path, None if args.no_expect_qwen2 else SPECIALS,
                           args.model_vocab_size))
    if stats.get("llama_cpp_test_mismatches"):
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        raise SystemExit(f"{stats['llama_cpp_test_mismatches']} of llama.cpp's test strings tokenize differently")
    stats["build_s"] = round(time.perf_counter() - t0, 1)
    stats["folder_bytes"] = sum(os.path.getsize(os.path.join(args.out_dir, f)) for f in os.listdir(args.out_dir))
    if not args.check_only:
        with open(os.path.join(args.out_dir, "bench_tokenizer_stats.json"), "w") as f:
            json.dump(stats, f, indent=2, ensure_ascii=False)
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


if __name__ == "__main__":
    main()
