"""Structured output through the HTTP server (real engine, embedded SmolLM2): response_format,
vLLM's structured_outputs and guided_* fields, and the openai SDK's parse()."""
from __future__ import annotations

import json
import re
import threading

import httpx
import pydantic
import pytest
from srv_harness import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: int


def test_openai_sdk_parse_returns_the_pydantic_object(client, model):
    completion = client.chat.completions.parse(
        model=model, max_tokens=80, temperature=0, response_format=City,
        messages=[{"role": "user", "content": "Describe Paris as JSON with name, country, population_millions."}])
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_response_format_json_object_and_vllm_fields(live_server, client, model):
    q = [{"role": "user", "content": "Give me a short answer."}]
    r = client.chat.completions.create(model=model, messages=q, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        json.loads(r.choices[0].message.content)
    r = client.chat.completions.create(model=model, messages=q, max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert r.choices[0].message.content in ("red", "green", "blue")
    r = client.completions.create(model=model, prompt="My phone number is", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].text)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "structured_outputs"),
    ({"guided_regex": "([a-"}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["x"]}, "guided_choice"),
])
def test_invalid_constraints_400_while_others_flow(live_server, model, body, param):
    done = {}

    def other():
        done["r"] = httpx.post(live_server.base_url + "/v1/completions", headers=H, timeout=300,
                               json={"model": model, "prompt": "Hello", "max_tokens": 8})
    t = threading.Thread(target=other)
    t.start()
    r = httpx.post(live_server.base_url + "/v1/chat/completions", headers=H, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
    t.join(300)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert done["r"].status_code == 200
