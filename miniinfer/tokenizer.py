"""Tokenizer helpers: load an HF tokenizer (folder or GGUF), chat templates, stop tokens."""
from __future__ import annotations

import glob
import os
from typing import Any

_ROLES = ("system", "user", "assistant", "tool")
# End-of-turn / end-of-text tokens that chat models emit; stopping on them mirrors the
# eos lists in HF generation_config.json files (Qwen: im_end + endoftext; Llama 3: eot/eom).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_path: str, gguf_file: str | None = None):
    """Load a transformers tokenizer.

    * ``model_path`` is an HF folder: ``AutoTokenizer.from_pretrained(model_path)``
      (or with ``gguf_file=`` when given, or when the folder has no tokenizer files
      but exactly one ``.gguf``);
    * ``model_path`` is a ``.gguf`` file: the tokenizer embedded in its metadata.
    """
    from transformers import AutoTokenizer

    if not isinstance(model_path, (str, os.PathLike)):
        raise ValueError(f"tokenizer path must be a string, got {model_path!r}")
    model_path = os.fspath(model_path)
    if os.path.isfile(model_path):
        if not model_path.endswith(".gguf"):
            raise ValueError(f"cannot load a tokenizer from {model_path!r}: expected an HF model "
                             "folder or a .gguf file")
        if gguf_file is not None and os.path.basename(gguf_file) != os.path.basename(model_path):
            raise ValueError(f"gguf_file={gguf_file!r} conflicts with the .gguf path {model_path!r}")
        folder, name = os.path.split(os.path.abspath(model_path))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if os.path.isdir(model_path):
        if gguf_file is not None:
            if not os.path.isfile(os.path.join(model_path, gguf_file)):
                raise ValueError(f"gguf_file {gguf_file!r} not found in {model_path!r}")
            return AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file)
        if any(os.path.isfile(os.path.join(model_path, f)) for f in _TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(model_path)
        ggufs = sorted(glob.glob(os.path.join(model_path, "*.gguf")))
        if len(ggufs) == 1:
            return AutoTokenizer.from_pretrained(model_path, gguf_file=os.path.basename(ggufs[0]))
        hint = ("; it holds several .gguf files, pass gguf_file= to pick one" if ggufs
                else "; it has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        raise ValueError(f"cannot load a tokenizer from folder {model_path!r}{hint}")
    raise ValueError(f"tokenizer path {model_path!r} does not exist (expected an HF model folder "
                     "or a .gguf file)")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}"
                         + ("" if messages else " (empty)"))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] is missing the 'role' field")
        if m["role"] not in _ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {', '.join(_ROLES)}, "
                             f"got {m['role']!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] is missing the 'content' field")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a string, "
                             f"got {type(m['content']).__name__}")


class ChatMessages(list):
    """Chat messages that carry the request's ``tools`` and ``chat_template_kwargs`` to
    :func:`apply_chat_template`: the server's chat prompt travels through engine methods that
    take only the messages, so the extras ride along with them."""

    def __init__(self, messages: list[dict], tools: list[dict] | None = None,
                 template_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools
        self.template_kwargs = template_kwargs


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None,
                        chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """Render ``messages`` with the tokenizer's chat template and return the prompt text.

    ``tools`` (OpenAI function definitions) and ``chat_template_kwargs`` (extra template
    variables, e.g. ``enable_thinking``) go to HF's ``apply_chat_template``; when not given
    they are taken from a :class:`ChatMessages`. A template may ignore the tools."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
                         "has no chat template; pass a plain prompt instead of chat messages")
    _validate_messages(messages)
    if tools is None:
        tools = getattr(messages, "tools", None)
    if chat_template_kwargs is None:
        chat_template_kwargs = getattr(messages, "template_kwargs", None)
    extra: dict[str, Any] = dict(chat_template_kwargs or {})
    if tools:
        extra["tools"] = tools
    out = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                        add_generation_prompt=add_generation_prompt, **extra)
    if not isinstance(out, str):  # some versions wrap a single conversation in a list
        out = out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else str(out)
    return out


def eos_token_ids(tokenizer, hf_config: dict | None) -> list[int]:
    """Token ids that end generation: config eos id(s), the tokenizer's eos, and (for chat
    models, i.e. with a chat template) the end-of-turn tokens present in the vocabulary."""
    ids: list[int] = []

    def add(x: Any) -> None:
        if x is None:
            return
        if isinstance(x, (list, tuple)):
            for y in x:
                add(y)
            return
        x = int(x)
        if x >= 0 and x not in ids:
            ids.append(x)

    add((hf_config or {}).get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    if getattr(tokenizer, "chat_template", None):
        vocab = tokenizer.get_vocab()
        for tok in _END_OF_TURN_TOKENS:
            add(vocab.get(tok))
    return ids


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM) spell each byte as one
    printable character: bytes that are printable stand for themselves, the other 68 are
    mapped in order to U+0100 onwards. Returns character -> byte."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenBytes:
    """``token_bytes(token_id) -> bytes``: the token's real bytes (a byte-fallback fragment of a
    multi-byte character stays that fragment; decoding one token alone would give U+FFFD).
    Special tokens give ``b""`` (their text is skipped in outputs). Cached per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = _byte_level_chars() if type(decoder).__name__ == "ByteLevel" else None

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def _bytes(self, token_id: int) -> bytes:
        import re
        if token_id in self._special:
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if m:
            return bytes([int(m.group(1), 16)])
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")
