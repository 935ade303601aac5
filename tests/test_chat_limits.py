"""The chat route's capacity: a full house of conversations is a 429 with Retry-After, and the scheduler decodes as
many sequences together as `max_num_seqs` (`cosmos3 serve --max-num-seqs`) says."""

from __future__ import annotations

import pytest
import test_server as base
from fastapi.testclient import TestClient

from cosmos3.cli import _server_settings, build_parser
from cosmos3.errors import RequestError
from cosmos3.reasoning.scheduler import PREFILL_CHUNK
from cosmos3.server.app import create_app

engine, settings = base.engine, base.settings  # the shared fixtures

CHAT = {"messages": [{"role": "user", "content": "Describe a kitchen."}], "max_tokens": 2}


def test_full_chat_house_is_429_with_retry_after(engine, settings):
    settings.limits.max_pending_chats = 1
    with TestClient(create_app(engine, settings)) as client:
        conversations = client.app.state.conversations
        conversations.admit()  # one conversation holds the only place
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "conversations" in r.json()["error"]["message"]
        conversations.release()
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_max_num_seqs_and_batched_tokens_size_the_scheduler(engine, settings):
    settings.max_num_seqs = 3
    settings.max_num_batched_tokens = 40
    with TestClient(create_app(engine, settings)) as client:
        scheduler = client.app.state.conversations.scheduler_for(engine.reasoner)
        assert scheduler.size == 3 and scheduler.chunk == 40
        assert scheduler.encode == engine.reasoner.embed_many  # prompts are embedded by the scheduler, together
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_serve_flags_reach_the_settings():
    args = build_parser().parse_args(
        ["serve", "--max-num-seqs", "8", "--max-pending-chats", "20", "--max-num-batched-tokens", "1024"]
    )
    s = _server_settings(args)
    assert s.max_num_seqs == 8 and s.limits.max_pending_chats == 20 and s.max_num_batched_tokens == 1024
    assert _server_settings(build_parser().parse_args(["serve"])).max_num_batched_tokens == PREFILL_CHUNK
    bad = (
        ["--max-num-seqs", "65"],
        ["--max-num-seqs", "0"],
        ["--max-pending-chats", "0"],
        ["--max-num-batched-tokens", "8"],
        ["--max-num-batched-tokens", "40000"],
    )
    for flags in bad:
        with pytest.raises(RequestError, match=flags[0][2:].replace("-", "_")):
            _server_settings(build_parser().parse_args(["serve", *flags]))


def test_a_prompt_past_max_prompt_tokens_is_a_400_naming_the_field(engine, settings):
    """Characters do not bound a prompt's tokens (each message adds its chat template), tokens do; the cap holds on
    both routes that reach the Reasoner, and a prompt under it is answered."""
    settings.limits.max_prompt_tokens = 64
    many = {"messages": [{"role": "user", "content": "a"}] * 40, "max_tokens": 2}  # 40 characters
    with TestClient(create_app(engine, settings)) as client:
        r = client.post("/v1/chat/completions", json=many)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and "at most 64 prompt tokens" in error["message"]
        r = client.post("/predict", json={"model_mode": "reasoner", "prompt": "word " * 200, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.app.state.conversations.pending == 0  # the refused conversations gave their places back


def test_max_prompt_tokens_flag_reaches_the_settings():
    args = build_parser().parse_args(["serve", "--max-prompt-tokens", "1000"])
    assert _server_settings(args).limits.max_prompt_tokens == 1000
    with pytest.raises(RequestError, match="max_prompt_tokens"):
        _server_settings(build_parser().parse_args(["serve", "--max-prompt-tokens", "0"]))
