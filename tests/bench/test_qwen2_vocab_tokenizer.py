"""``benchmarks/qwen2_vocab_tokenizer.py`` offline: a tiny vocab-only GGUF shaped like llama.cpp's
``ggml-vocab-qwen2.gguf`` (gpt2 BPE, ``qwen2`` pre-tokenizer, 256 byte tokens + merges, the three
Qwen2 special tokens, user-defined ``[PAD...]`` padding, ChatML template) is written in a temp dir
with ``gguf.GGUFWriter``; the script converts it with transformers, drops the pads, adds NFC, and
the folder loads with transformers and xgrammar."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "qwen2_vocab_tokenizer.py")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tiny_qwen2_vocab(path: str) -> tuple[int, int]:
    gguf = pytest.importorskip("gguf")
    byte_tokens = _byte_chars()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ {", "Ġ \"", "\" :"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pads = [f"[PAD{i}]" for i in range(256 + len(merged) + 3, 256 + len(merged) + 3 + 5)]
    tokens = byte_tokens + merged + specials + pads
    types = [1] * (256 + len(merged)) + [3] * 3 + [4] * len(pads)  # normal, control, user-defined
    eos = 256 + len(merged)
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("qwen2")
    w.add_block_count(2)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_chat_template(CHATML)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(tokens), eos


def test_convert_tiny_gguf(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("xgrammar")
    src = tmp_path / "ggml-vocab-tiny.gguf"
    n_tokens, eos = write_tiny_qwen2_vocab(str(src))
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, SCRIPT, str(out), "--gguf", str(src), "--no-expect-qwen2",
                           "--model-vocab-size", "512"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stats = json.loads((out / "bench_tokenizer_stats.json").read_text())
    assert stats["gguf_tokens"] == n_tokens and stats["dropped_pad_tokens"] == 5
    assert stats["len_tokenizer"] == n_tokens - 5 == eos + 3
    assert stats["eos_token_id"] == eos and stats["xgrammar_stop_token_ids"] == [eos]
    assert stats["xgrammar_vocab_type"].endswith("BYTE_LEVEL")

    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert "[PAD" not in json.dumps(tok.get_added_vocab())
    ids = tok.encode(" the", add_special_tokens=False)
    assert ids == [tok.convert_tokens_to_ids("Ġthe")]  # the GGUF's merges, applied
    text = "Cafe\u0301 ✓ 🦙"  # decomposed é: NFC composes it
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == "Café ✓ 🦙"
    assert os.path.getsize(out / "tokenizer.json") < 100_000
