"""Per-request sampling options, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

import math
from dataclasses import dataclass

from miniinfer.errors import InvalidRequestError

MAX_LOGPROBS = 20  # the largest top-N logprobs a request may ask for (the engine default too)
# Temperatures below this sample greedily: the limit T -> 0 of softmax(logits / T) is the
# argmax, and dividing by a tinier T only overflows (vLLM uses the same threshold).
GREEDY_TEMPERATURE = 1e-5
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # a signed 64-bit seed, as in the OpenAI API
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


@dataclass
class StructuredOutputsParams:
    """Constrain the output (vLLM's names); exactly one of these is set.

    ``json``: a JSON schema (dict or JSON string); ``json_object``: any JSON object;
    ``regex``; ``grammar``: an EBNF (GBNF-style) grammar; ``choice``: one of these strings."""
    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    def kind(self) -> str:
        """Raises ``InvalidRequestError`` unless exactly one constraint is set."""
        set_ = [k for k in ("json", "json_object", "regex", "grammar", "choice") if getattr(self, k)]
        if len(set_) != 1:
            raise InvalidRequestError(f"structured_outputs needs exactly one of json, json_object, regex, grammar, "
                                      f"choice; got {set_ or 'none'}", "structured_outputs")
        if set_[0] == "choice" and (not isinstance(self.choice, list)
                                    or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a list of non-empty strings",
                                      "structured_outputs")
        return set_[0]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raises ``InvalidRequestError`` (a ``ValueError``) whose ``param`` names the field."""
        def bad(name: str, rule: str, value) -> InvalidRequestError:
            return InvalidRequestError(f"{name} must be {rule}, got {value!r}", name)

        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number", value)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", f"an integer in [{SEED_MIN}, {SEED_MAX}]", self.seed)
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", ">= 1", self.n)
        if self.temperature < 0:
            raise bad("temperature", ">= 0", self.temperature)
        if not (0 < self.top_p <= 1):
            raise bad("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            raise bad("top_k", "-1 (disabled) or >= 1", self.top_k)
        if not (0 <= self.min_p <= 1):
            raise bad("min_p", "in [0, 1]", self.min_p)
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0", self.repetition_penalty)
        if not (-2 <= self.presence_penalty <= 2):
            raise bad("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not (-2 <= self.frequency_penalty <= 2):
            raise bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", ">= 1", self.max_tokens)
        if self.min_tokens < 0:
            raise bad("min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"in [0, {MAX_LOGPROBS}]", self.logprobs)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                    not isinstance(t, int) or t < 0 or isinstance(v, bool) or not isinstance(v, (int, float))
                    or not math.isfinite(v) or not (-100 <= v <= 100) for t, v in self.logit_bias.items()):
                raise bad("logit_bias", "a dict of token ids (int >= 0) to biases in [-100, 100]", self.logit_bias)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad("structured_outputs", "a StructuredOutputsParams", self.structured_outputs)
            self.structured_outputs.kind()
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "a list of non-empty strings", self.stop)

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
