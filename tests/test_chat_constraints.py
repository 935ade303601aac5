"""Bounds on what one chat request may ask of the shared decode loop, on the tiny Reasoner: `stop` strings (matched
on every step of every row), and json_schema response_formats that llguidance validates but cannot enforce (too
large for its lexer) or that no JSON value satisfies (a `$ref` cycle). Each is a 400 naming its field before the
request joins the batch, through HTTP (streamed or not) and `engine.reason`; a grammar that fails only later, while
decoding, is still the request's error, not a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import cosmos3
from cosmos3.errors import RequestError
from cosmos3.reasoning.decoding import MAX_STOP_CHARS, MAX_STOPS, Sampling
from cosmos3.reasoning.reasoner import Request
from cosmos3.server.app import Settings, create_app

HI = [{"role": "user", "content": "Describe a cup."}]
SCHEMA_FIELD = "response_format.json_schema.schema"


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", surfaces=["reasoner"])


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("constraints")
    settings = Settings(model_name="cosmos3-tiny", jobs_db=folder / "jobs.db", outputs_dir=folder)
    with TestClient(create_app(engine, settings)) as c:
        yield c


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4, **fields})


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def error_of(r) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


# ------------------------------------------------------------------------------------------- stop
@pytest.mark.parametrize(
    ("stop", "words"),
    [
        ([f"zz{i}qq" for i in range(MAX_STOPS + 1)], f"has {MAX_STOPS + 1} strings"),
        ([f"zz{i}qq" for i in range(100_000)], "has 100000 strings"),
        ("x" * 1_000_000, "is 1000000 characters long"),
        (["ok", "q" * (MAX_STOP_CHARS + 1)], f"is {MAX_STOP_CHARS + 1} characters long"),
    ],
)
def test_too_many_or_too_long_stop_strings_are_a_400_naming_stop(client, engine, stop, words):
    error = error_of(chat(client, stop=stop))
    assert error["param"] == "stop" and words in error["message"], error
    assert f"at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters" in error["message"]
    assert len(error["message"]) < 400  # the value abbreviated, not echoed
    assert error_of(chat(client, stop=stop, stream=True))["param"] == "stop"
    with pytest.raises(RequestError) as err:
        engine.reason(HI, max_tokens=2, stop=stop)
    assert err.value.field == "stop"


def test_stop_strings_at_the_bounds_are_taken(client, engine):
    stops = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOPS)]  # characters, not bytes, are counted
    r = chat(client, stop=stops)
    assert r.status_code == 200, r.text
    assert isinstance(engine.reason(HI, max_tokens=2, stop=stops), str)


@pytest.mark.parametrize("stop", [5, [["a"]], {"a": 1}, ["a", 3]])
def test_a_stop_of_the_wrong_type_names_stop(client, stop):
    """Not pydantic's name of a union branch (`stop.str`)."""
    error = error_of(chat(client, stop=stop))
    assert error["param"] == "stop" and error["message"].startswith("stop="), error
    assert f"a list of at most {MAX_STOPS} strings" in error["message"]


# ------------------------------------------------------------------------------------------- schemas
TOO_LARGE = [
    {"type": "string", "pattern": "^a{1000000}$"},
    {"const": "x" * 1_000_000},
    {"type": "object", "properties": {"a": {"const": "x" * 1_000_000}}, "required": ["a"]},
]
CYCLES = [
    {"$ref": "#"},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    {"allOf": [{"$ref": "#"}]},
]


@pytest.mark.parametrize("schema", TOO_LARGE, ids=["pattern", "const", "nested-const"])
def test_a_schema_too_large_for_the_lexer_is_a_400_not_a_500(client, engine, schema):
    for stream in (False, True):
        error = error_of(chat(client, response_format=schema_format(schema), stream=stream))
        assert error["param"] == SCHEMA_FIELD and "cannot be enforced" in error["message"], error
        assert "too many expressions" in error["message"] and len(error["message"]) < 400  # no 1 MB schema
    with pytest.raises(RequestError) as err:
        engine.reason(HI, max_tokens=2, response_format=schema_format(schema))
    assert err.value.field == SCHEMA_FIELD
    assert client.app.state.conversations.pending == 0  # the refused requests gave their places back
    assert chat(client).status_code == 200


@pytest.mark.parametrize("schema", CYCLES, ids=["self", "a-b-a", "allOf-self"])
def test_a_ref_cycle_with_no_base_case_is_unsatisfiable(client, engine, schema):
    for stream in (False, True):
        error = error_of(chat(client, response_format=schema_format(schema), stream=stream))
        assert error["param"] == SCHEMA_FIELD and "unsatisfiable" in error["message"], error
    with pytest.raises(RequestError, match="unsatisfiable"):
        engine.reason(HI, max_tokens=2, response_format=schema_format(schema))


def test_a_recursive_schema_with_a_base_case_is_enforced(client):
    tree = {
        "$ref": "#/$defs/n",
        "$defs": {"n": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#/$defs/n"}}]}},
    }
    r = chat(client, response_format=schema_format(tree), max_tokens=32, temperature=0)
    assert r.status_code == 200, r.text


def test_a_grammar_that_fails_while_decoding_is_the_requests_error(engine):
    """A grammar can fail at a later token, past the checks (here they are skipped): the row ends with a
    RequestError naming the schema, short, and the next request decodes."""
    reasoner = engine.reasoner
    fmt = schema_format(TOO_LARGE[0])
    params = Sampling(max_tokens=4, temperature=0, response_format=fmt).resolved().check()
    grammar = reasoner.grammar(fmt)  # validated, not yet stepped
    request = Request(params, grammar, [reasoner.tokenize(HI)])
    with pytest.raises(RequestError) as err:
        list(reasoner.decode_scheduled(reasoner.decode_of(request), reasoner.scheduler))
    assert err.value.field == SCHEMA_FIELD and len(str(err.value)) < 400, err.value
    assert isinstance(engine.reason(HI, max_tokens=2), str)
