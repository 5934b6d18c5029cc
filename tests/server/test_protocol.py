"""Request validation without a server: Field bounds name the field, the logprob limit is shared."""
from __future__ import annotations

import pytest

from miniinfer.sampling_params import MAX_LOGPROBS
from miniinfer.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

CHAT = [{"role": "user", "content": "hi"}]


def chat_error(**body) -> APIError:
    with pytest.raises(APIError) as ei:
        parse_request(ChatCompletionRequest, {"messages": CHAT, **body}).to_sampling_params(8, 512)
    assert ei.value.status == 400
    return ei.value


@pytest.mark.parametrize("body,message", [
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"temperature": 101}, "temperature must be <= 100, got 101"),
    ({"top_p": 0}, "top_p must be > 0, got 0"),
    ({"top_p": 1.5}, "top_p must be <= 1, got 1.5"),
    ({"n": 0}, "n must be >= 1, got 0"),
    ({"n": 9}, "n must be <= 8 (the server's limit), got 9"),
    ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, f"top_logprobs must be <= {MAX_LOGPROBS}, got {MAX_LOGPROBS + 1}"),
    ({"top_logprobs": 2}, "top_logprobs requires logprobs to be true"),
])
def test_range_errors_name_the_field(body, message):
    err = chat_error(**body)
    assert err.param == list(body)[-1]
    assert err.message == message


def test_logprob_limit_is_the_engine_limit():
    req = parse_request(ChatCompletionRequest, {"messages": CHAT, "logprobs": True, "top_logprobs": MAX_LOGPROBS})
    assert req.to_sampling_params(8).logprobs == MAX_LOGPROBS
    assert parse_request(CompletionRequest, {"prompt": "x", "logprobs": MAX_LOGPROBS}).to_sampling_params(8).logprobs \
        == MAX_LOGPROBS
    with pytest.raises(APIError) as ei:
        parse_request(CompletionRequest, {"prompt": "x", "logprobs": MAX_LOGPROBS + 1})
    assert ei.value.param == "logprobs"


def test_defaults_pass():
    p = parse_request(ChatCompletionRequest, {"messages": CHAT, "temperature": None, "top_p": None,
                                              "n": None}).to_sampling_params(8)
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.logprobs) == (1, 1.0, 1.0, None, None)
