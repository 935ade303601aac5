"""OpenAI's chat fields through the `openai` client against the app on the tiny Reasoner: response_format (schema-valid
JSON from random weights: only constrained decoding can do that), n, stop, seed, logprobs, penalties,
max_completion_tokens, stream_options.include_usage and finish_reason; the documents' sampling settings as defaults;
fields the server does not take are 400s naming them."""

from __future__ import annotations

import json

import jsonschema_rs  # schemathesis, a test dependency, brings it
import pytest
from openai import BadRequestError, OpenAI
from test_server import LiveServer

import cosmos3
from cosmos3.reasoning.decoding import DEFAULTS, Sampling
from cosmos3.server.app import Settings

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cup", "plate", "robot"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["label", "count", "kind", "tags"],
    "additionalProperties": False,
}
HI = [{"role": "user", "content": "Describe a cup."}]


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", surfaces=["reasoner"])


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    server = LiveServer(engine, Settings(model_name="cosmos3-tiny", jobs_db=folder / "jobs.db", outputs_dir=folder))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def create(client, **kwargs):
    return client.chat.completions.create(model="cosmos3-tiny", messages=kwargs.pop("messages", HI), **kwargs)


def test_json_schema_gives_schema_valid_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    reply = create(client, response_format=fmt, max_tokens=200, n=3, seed=1)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema_rs.validate(SCHEMA, json.loads(choice.message.content))
    stream = create(client, response_format=fmt, max_tokens=200, seed=1, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content  # choice 0 has seed 1, streamed or not


def test_json_object_and_text(client):
    reply = create(client, response_format={"type": "json_object"}, max_tokens=300, seed=2, temperature=0.3)
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # the budget ended it: a prefix of a JSON object
        assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content.startswith("{")
    plain = create(client, response_format={"type": "text"}, max_tokens=5, temperature=0)
    assert plain.choices[0].message.content == create(client, max_tokens=5, temperature=0).choices[0].message.content


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "xml"}, "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "response_format"),
    ],
)
def test_bad_response_formats_are_400(client, fmt, param):
    with pytest.raises(BadRequestError) as err:
        create(client, response_format=fmt, max_tokens=5)
    assert err.value.body["param"].startswith(param)


def test_finish_reason_length_and_usage_in_streams(client):
    stream = create(client, max_completion_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1])
    reply = create(client, max_completion_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


def test_n_seed_and_stop(client):
    reply = create(client, n=3, max_tokens=12, seed=5, temperature=1.0)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) > 1
    again = create(client, n=3, max_tokens=12, seed=5, temperature=1.0)
    assert [c.message.content for c in again.choices] == texts  # the same seed, the same choices
    assert reply.usage.completion_tokens == sum(12 if c.finish_reason == "length" else 0 for c in reply.choices) or (
        reply.usage.completion_tokens <= 36
    )
    one = create(client, max_tokens=12, seed=5, temperature=1.0)
    assert one.choices[0].message.content == texts[0]  # choice i is seeded seed + i
    streamed = create(client, n=3, max_tokens=12, seed=5, temperature=1.0, stream=True)
    joined = {}
    for chunk in streamed:
        for c in chunk.choices:
            joined[c.index] = joined.get(c.index, "") + (c.delta.content or "")
    assert [joined[i] for i in range(3)] == texts
    stop = texts[0][3:5]
    cut = create(client, max_tokens=12, seed=5, temperature=1.0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == texts[0][: texts[0].index(stop)]
    streamed_cut = create(client, max_tokens=12, seed=5, temperature=1.0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed_cut) == cut.choices[0].message.content


def test_logprobs(client, engine):
    reply = create(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= 0 and entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
    greedy_free = create(client, max_tokens=6, temperature=0, presence_penalty=0, logprobs=True, top_logprobs=1)
    for entry in greedy_free.choices[0].logprobs.content:  # without penalties greedy takes the most likely token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    stream = create(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert create(client, max_tokens=3).choices[0].logprobs is None
    with pytest.raises(BadRequestError) as err:
        create(client, max_tokens=3, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"


def test_frequency_penalty_changes_the_reply(client):
    base = create(client, max_tokens=16, temperature=0, presence_penalty=0)
    penalised = create(client, max_tokens=16, temperature=0, presence_penalty=0, frequency_penalty=2.0)
    assert base.choices[0].message.content != penalised.choices[0].message.content
    with pytest.raises(BadRequestError) as err:
        create(client, max_tokens=3, frequency_penalty=3.0)
    assert err.value.body["param"] == "frequency_penalty"


def test_the_documents_settings_are_the_defaults(client, engine, monkeypatch):
    seen = []
    original = engine.reasoner.read

    def spy(conversations, params, **kwargs):
        request = original(conversations, params, **kwargs)
        seen.append(request.params)  # as resolved for decoding
        return request

    monkeypatch.setattr(engine.reasoner, "read", spy)
    create(client, max_tokens=2)
    think = [{"role": "user", "content": "Is it stable? Answer in <think>...</think> then the answer."}]
    create(client, messages=think, max_tokens=2, stream=True)
    for params, reasoning in zip(seen, (False, True), strict=True):
        assert {k: getattr(params, k) for k in DEFAULTS[reasoning]} == DEFAULTS[reasoning]
    assert DEFAULTS[False] == dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.0, presence_penalty=1.5)
    assert DEFAULTS[True] == dict(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.0, presence_penalty=0.0)
    # The same from Python: unset fields are the documents', and a reasoning request gets the reasoning ones.
    assert engine.reason(HI, max_tokens=8, seed=3) == engine.reason(HI, max_tokens=8, seed=3, **DEFAULTS[False])
    assert engine.reason(HI, max_tokens=8, seed=3, reasoning=True) == engine.reason(
        HI, max_tokens=8, seed=3, reasoning=True, **DEFAULTS[True]
    )
    assert Sampling().resolved(True).temperature == 0.6


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"n": 17}, "n"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_fields_not_taken_are_400_naming_them(client, extra, param):
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="cosmos3-tiny", messages=HI, max_tokens=2, extra_body=extra)
    assert err.value.body["param"] == param
