"""Incremental (streaming) detokenization.

Turning a growing list of generated token ids into text one step at a time is
not as simple as decoding each new token on its own:

* byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM...) split one UTF-8
  character over several tokens, so a single token may decode to half a
  character (shown as U+FFFD);
* SentencePiece-style decoders (Metaspace, or Llama-2's ``Strip`` decoder) drop
  the leading space of the *first* token they see, so a token decoded alone
  loses its space;
* decoding the whole sequence every step costs O(length) per step, O(n^2) per
  request.

:class:`IncrementalDetokenizer` keeps two offsets into the token ids (the
"prefix_offset / read_offset" technique): ``ids[prefix:read]`` is the
already-emitted context and ``ids[read:]`` are the tokens not emitted yet.
Each step decodes only the short window ``ids[prefix:]`` and emits the part
past ``decode(ids[prefix:read])``; both decodes see the same first token, so
the leading-space rule cancels out.  When the window ends in U+FFFD (an
incomplete character) nothing is emitted and the offsets stay put until later
tokens complete the character.

Everything emitted, concatenated, equals ``tokenizer.decode(ids)`` for the
generated ids (exactly so for byte-level BPE; for SentencePiece-style
tokenizers the text keeps the leading space that the prompt context gives the
first generated token, the way it reads in ``decode(prompt + ids)``).

Why not ``tokenizers.decoders.DecodeStream`` (measured with tokenizers 0.23.3
on the embedded SmolLM2 tokenizer)?  It is a little faster (about 0.9-1.0
against 1.1-1.5 us per token), but on its own it has no flush for a trailing
incomplete character, no ``clean_up_tokenization_spaces``, no path for
tokenizers without a Rust backend; when its prompt context ends mid-character
it emits the prompt text itself, and with byte-fallback (Llama-style)
vocabularies an invalid byte run makes ``step`` raise "Invalid prefix".
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens to use as decoding context for the first generated
# token, and how far further back we may move to avoid starting mid-character.
_INITIAL_CONTEXT = 5
_MAX_EXTRA_CONTEXT = 8
# A UTF-8 character is at most 4 bytes, so the incomplete tail of a multi-token
# push spans at most a few tokens (+1 for slack, e.g. a trailing skipped
# special token).
_MAX_PARTIAL_TAIL = 4
# Drop already-consumed ids from the buffer once this many have piled up.
_TRIM_AT = 256

_FAST_DECODE_MODULES = (
    "transformers.tokenization_utils_fast",  # transformers 4.x
    "transformers.tokenization_utils_tokenizers",  # transformers 5.x
)


def _backend_of(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` whose ``decode`` gives exactly what
    ``tokenizer.decode`` gives before clean-up, or None when there is none."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return None
    # A subclass that overrides _decode may post-process; then use its decode.
    owner = next((c for c in type(tokenizer).__mro__ if "_decode" in c.__dict__), None)
    if owner is None or owner.__module__ not in _FAST_DECODE_MODULES:
        return None
    return backend


def _cleanup_of(tokenizer) -> Callable[[str], str] | None:
    """The clean-up that ``tokenizer.decode`` applies to its text, or None."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    fn = getattr(tokenizer, "clean_up_tokenization", None)
    if fn is None:
        return None
    # transformers 5 ignores the flag for BPE models unless told otherwise.
    bpe_flag = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (hasattr(tokenizer, bpe_flag) and backend is not None
            and type(backend.model).__name__ == "BPE" and not getattr(tokenizer, bpe_flag)):
        return None
    return fn


def _is_concatenative(backend) -> bool:
    """True when the decoder is plain byte-level: decode(a + b) ==
    decode(a) + decode(b) whenever decode(a) ends on a complete character.
    Then the context text for the next step is exactly the text just emitted,
    which saves one decode per step."""
    if backend is None:
        return False
    dec = backend.decoder
    return dec is not None and type(dec).__name__ == "ByteLevel"


def _cleanup_cut(s: str) -> int:
    """Largest p such that s[:p] can be cleaned up independently of what
    follows.  Every clean-up pattern (" .", " n't", " ' " ...) starts with a
    space and is at most 4 characters long, so a cut is safe when the 3
    characters before it hold no space."""
    p = len(s)
    while p > 0:
        i = s.rfind(" ", max(0, p - 3), p)
        if i < 0:
            return p
        p = i
    return 0


class IncrementalDetokenizer:
    """Streams the text of generated token ids, O(new tokens) per step.

    ``push(ids)`` adds one or several generated ids and returns the newly
    completed text (maybe ""); ``finish()`` flushes whatever is held back.
    ``text`` holds everything emitted so far.  Pushing a whole list at once
    decodes it in a single call (the fast path for non-streaming requests).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.num_tokens = 0  # generated ids pushed so far
        self._finished = False

        backend = _backend_of(tokenizer)
        if backend is not None:
            bdecode = backend.decode
            self._decode = lambda ids: bdecode(ids, skip_special_tokens=skip_special_tokens)
        else:
            tdecode = tokenizer.decode
            self._decode = lambda ids: tdecode(ids, skip_special_tokens=skip_special_tokens,
                                               clean_up_tokenization_spaces=False)
        self._concat = _is_concatenative(backend)
        self._cleanup = _cleanup_of(tokenizer)
        self._raw_tail = ""  # decoded text waiting for a safe clean-up cut

        # Only the tail of the prompt matters: it is decoding context.
        prompt = list(prompt_token_ids[-(_INITIAL_CONTEXT + _MAX_EXTRA_CONTEXT):])
        self._ids: list[int] = prompt
        self._read = len(prompt)
        prefix = max(0, self._read - _INITIAL_CONTEXT)
        prefix_text = self._decode(prompt[prefix:]) if prefix < self._read else ""
        # Do not start the context in the middle of a character: its bytes
        # would decode differently with and without what follows.
        while prefix > 0 and prefix_text.startswith(REPLACEMENT_CHAR):
            prefix -= 1
            prefix_text = self._decode(prompt[prefix:])
        self._prefix = prefix
        self._prefix_text: str | None = prefix_text

    # -- public API -----------------------------------------------------

    def push(self, token_ids: Sequence[int] | int) -> str:
        """Add generated token ids; return the newly completed text."""
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        if self._finished:
            raise RuntimeError("push() after finish()")
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        self.num_tokens += len(token_ids)
        return self._emit(self._step(), final=False)

    def finish(self, drop_incomplete: bool = False) -> str:
        """End of sequence: emit everything held back and return it. An incomplete
        trailing character becomes U+FFFD, as in a full decode, or with
        ``drop_incomplete`` is left out (vLLM's output text: a request cut by
        ``max_tokens`` mid-character never ends in U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        raw = ""
        if len(self._ids) > self._read:
            prefix_text = self._get_prefix_text()
            full = self._decode(self._ids[self._prefix:])
            raw = full[len(prefix_text):]
            if drop_incomplete:
                raw = raw.rstrip(REPLACEMENT_CHAR)
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = None
        return self._emit(raw, final=True)

    # -- internals ------------------------------------------------------

    def _get_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        return self._prefix_text

    def _step(self) -> str:
        ids = self._ids
        prefix_text = self._get_prefix_text()
        end = len(ids)
        full = self._decode(ids[self._prefix:])
        if full.endswith(REPLACEMENT_CHAR):
            # Incomplete character at the end.  With several new tokens, emit
            # up to the last complete one instead of holding them all.
            full = ""
            for k in range(1, min(_MAX_PARTIAL_TAIL, end - self._read - 1) + 1):
                cand = self._decode(ids[self._prefix:end - k])
                if not cand.endswith(REPLACEMENT_CHAR):
                    full, end = cand, end - k
                    break
            if not full:
                return ""
        if len(full) <= len(prefix_text):
            # Nothing new yet (e.g. only skipped special tokens): keep the
            # window as is so later tokens still get this context.
            return ""
        delta = full[len(prefix_text):]
        self._prefix, self._read = self._read, end
        self._prefix_text = delta if self._concat else None
        if self._prefix >= _TRIM_AT:
            del ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def _emit(self, raw: str, final: bool) -> str:
        if self._cleanup is None:
            if raw:
                self.text += raw
            return raw
        s = self._raw_tail + raw
        cut = len(s) if final else _cleanup_cut(s)
        self._raw_tail = s[cut:]
        out = self._cleanup(s[:cut]) if cut else ""
        if out:
            self.text += out
        return out
