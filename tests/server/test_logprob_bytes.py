"""Issue #11, kind 4: token <-> bytes <-> text accounting in logprobs, against the real engine
(embedded SmolLM2, whose byte-level vocabulary splits Chinese characters over tokens)."""
from __future__ import annotations

import codecs

import httpx
import pytest
from srv_harness import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}
CHINESE = "用中文回答：中国的首都是哪里？"
FFFD = [239, 191, 189]


def post(srv, path, body):
    r = httpx.post(srv.base_url + path, json=body, headers=H, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def _char_offsets(chunks: list[bytes]) -> list[int]:
    """Where each token's text starts in the decoded text: characters completed before it."""
    dec, n, out = codecs.getincrementaldecoder("utf-8")("replace"), 0, []
    for b in chunks:
        out.append(n)
        n += len(dec.decode(b))
    return out


@pytest.mark.parametrize("max_tokens", [7, 16])
def test_chat_logprob_bytes_are_the_tokens_real_bytes(live_server, max_tokens):
    body = post(live_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": CHINESE}], "max_tokens": max_tokens, "temperature": 0,
        "logprobs": True, "top_logprobs": 3})
    choice = body["choices"][0]
    content = choice["message"]["content"]
    tokens = choice["logprobs"]["content"]
    joined = b"".join(bytes(t["bytes"]) for t in tokens)
    # the content is the tokens' bytes (an incomplete trailing character is left out of it)
    assert joined.decode("utf-8", errors="ignore") == content
    if "\ufffd" not in content:
        assert all(t["bytes"] != FFFD for t in tokens), tokens
    for t in tokens:
        assert all(top["bytes"] != FFFD or "\ufffd" in top["token"] for top in t["top_logprobs"])


def test_completion_top_logprobs_keep_every_candidate_and_offsets_index_the_text(live_server):
    body = post(live_server, "/v1/completions", {
        "prompt": CHINESE, "max_tokens": 12, "temperature": 0, "logprobs": 5, "echo": False})
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert all(len(d) >= 5 for d in lp["top_logprobs"]), [len(d) for d in lp["top_logprobs"]]
    text = choice["text"]
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    # streaming gives the same offsets and keys
    with httpx.stream("POST", live_server.base_url + "/v1/completions", headers=H, timeout=180, json={
            "prompt": CHINESE, "max_tokens": 12, "temperature": 0, "logprobs": 5, "stream": True}) as r:
        import json
        got_offsets, got_tokens = [], []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"]
                if c and c[0].get("logprobs"):
                    got_offsets += c[0]["logprobs"]["text_offset"]
                    got_tokens += c[0]["logprobs"]["tokens"]
    assert got_offsets == offsets and got_tokens == lp["tokens"]


def test_text_offsets_follow_the_bytes():
    """Unit level: offsets count the characters completed by earlier tokens' bytes."""
    from miniinfer.outputs import Logprob
    from miniinfer.server.serving import ChoiceState
    from miniinfer.server.serving_completion import completion_logprobs
    chunks = [b"\xe5\x8c", b"\x97", b"\xe4\xba", b"\xac", b" h", b"\xc3\xa9", b"llo"]  # '北京 héllo'
    lps = [{i: Logprob(-1.0, 1, "\ufffd" if b"\xe5" in b or len(b) == 1 and b[0] > 127 else b.decode("utf-8", "replace"), b)}
           for i, b in enumerate(chunks)]
    out = completion_logprobs(list(range(len(chunks))), lps, 0, ChoiceState(3))
    assert out.text_offset == [3 + o for o in _char_offsets(chunks)] == [3, 3, 4, 4, 5, 7, 8]
    assert len(set(out.tokens)) == len(out.tokens)  # fragments get distinct 'bytes:' keys
