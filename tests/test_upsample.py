"""Prompt upsampling against a local fake OpenAI-compatible server, and with the tiny model's own Reasoner."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import jsonschema_rs  # schemathesis, a test dependency, brings it
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import cosmos3
from cosmos3.upsample import Upsampler, endpoint_completer, self_completer

VALID = {
    "subjects": [{"description": "a red robot arm", "location": "center"}],
    "background_setting": "a bright lab",
    "lighting": {"conditions": "soft daylight"},
    "temporal_caption": "The arm lifts a cup.",
    "actions": [{"time": "0:00-0:04", "description": "the arm lifts the cup"}],
}


def fake_app() -> FastAPI:
    app = FastAPI()
    app.state.calls = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.calls.append(body)
        model = body["model"]
        if model == "no-formats" and "response_format" in body:  # an endpoint without structured outputs
            return JSONResponse({"error": {"message": "response_format is not supported", "code": 400}}, 400)
        attempt = sum(1 for c in app.state.calls if c["messages"] == body["messages"])
        if model in ("valid", "no-formats") or (model == "flaky" and attempt > 1):
            content = "```json\n" + json.dumps(VALID) + "\n```"
        elif model == "long":
            content = json.dumps({**VALID, "background_setting": "a very detailed lab " * 60})
        elif model == "flaky":
            content = "Sure! Here is a prompt: {not json"
        else:
            content = json.dumps({"caption": "wrong keys"})
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }

    return app


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = fake_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", app
    server.should_exit = True
    thread.join(10)


def upsample(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "prompts.txt").write_text("a robot arm lifts a cup\n\n   \na dog runs on a beach\n")
    return subprocess.run(
        [sys.executable, "-m", "cosmos3.cli", "upsample", "--input", str(tmp_path / "prompts.txt"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_valid_replies_become_structured_prompts(endpoint, tmp_path):
    url, app = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "valid",
        "--resolution",
        "480",
        "--aspect-ratio",
        "16,9",
    )
    assert proc.returncode == 0, proc.stderr
    prompts = json.loads((tmp_path / "out.json").read_text())
    assert len(prompts) == 2  # blank lines are skipped
    assert prompts[0]["resolution"] == {"H": 480, "W": 832} and prompts[0]["aspect_ratio"] == "16,9"
    assert prompts[0]["duration"] == "7s" and prompts[0]["fps"] == 24.0
    assert prompts[0]["subjects"] == VALID["subjects"]
    body = app.state.calls[-1]  # the documents' sampling defaults reach the endpoint
    assert (body["temperature"], body["top_p"], body["top_k"], body["presence_penalty"], body["seed"]) == (
        0.7,
        0.8,
        20,
        1.5,
        3407,
    )


def test_invalid_then_valid_is_retried_and_jsonl(endpoint, tmp_path):
    url, _ = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.jsonl"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "flaky",
    )
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["subjects"] for line in lines)


def test_always_invalid_is_a_clear_error(endpoint, tmp_path):
    url, _ = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "broken",
    )
    assert proc.returncode == 2
    assert "no valid JSON in 3 attempts" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_image2video_needs_an_image_and_sends_it(endpoint, tmp_path):
    url, app = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "image2video",
        "--endpoint-url",
        url,
        "--model",
        "valid",
    )
    assert proc.returncode == 2 and "image_url" in proc.stderr
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "first.png")
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "image2video",
        "--endpoint-url",
        url,
        "--model",
        "valid",
        "--image-url",
        str(tmp_path / "first.png"),
    )
    assert proc.returncode == 0, proc.stderr
    part = app.state.calls[-1]["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")


def test_long_prompts_are_reported(endpoint, tmp_path):
    url, _ = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "long",
    )
    assert proc.returncode == 0 and "over the model's 512-token conditioning limit" in proc.stderr
    assert len(json.loads((tmp_path / "out.json").read_text())[0]["background_setting"]) > 1000  # not cut


def test_self_upsampling_with_too_small_a_budget_fails_clearly(tmp_path):
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2image",
        "--self",
        "--checkpoint",
        "tiny",
        "--max-tokens",
        "16",
    )
    # 16 tokens cannot hold the structured JSON: the reply is cut, retried with new seeds, then reported.
    assert proc.returncode == 2, proc.stderr
    assert "no valid JSON in 3 attempts" in proc.stderr


# ------------------------------------------------------------------ structured outputs, seeds, the openai client
@pytest.fixture(scope="module")
def tiny():
    return cosmos3.load("tiny", surfaces=["reasoner"])


@pytest.mark.parametrize("mode", ["text2image", "text2video"])
def test_self_upsampling_succeeds_on_tiny_through_constrained_decoding(tiny, mode):
    """Random weights write schema-valid structured prompts only because decoding is held to the schema."""
    upsampler = Upsampler(mode, self_completer(tiny), resolution="480", max_field_chars=8)
    obj = upsampler.upsample("a robot arm lifts a cup")
    assert upsampler.parse(json.dumps(obj)) == obj and obj["resolution"] == {"H": 480, "W": 832}
    geometry = {"resolution", "aspect_ratio", "duration", "fps"}
    jsonschema_rs.validate(upsampler.schema, {k: v for k, v in obj.items() if k not in geometry})
    free = self_completer(tiny, max_tokens=64)(upsampler.messages("a robot arm lifts a cup", None))
    assert upsampler.parse(free) is None  # the same model unconstrained writes no structured prompt


def test_retries_use_a_new_seed():
    calls = []

    def complete(messages, seed, response_format):
        calls.append((seed, response_format["json_schema"]["schema"]["required"]))
        return "not json" if len(calls) < 3 else json.dumps(VALID)

    assert Upsampler("text2video", complete).upsample("a cup")["subjects"] == VALID["subjects"]
    assert [seed for seed, _ in calls] == [3407, 3408, 3409]
    assert calls[0][1] == ["subjects", "background_setting", "temporal_caption"]


def test_the_schema_goes_to_endpoints_as_response_format(endpoint, monkeypatch):
    url, app = endpoint
    upsampler = Upsampler("text2video", endpoint_completer(url, "valid", None))
    upsampler.upsample("a cup")
    assert app.state.calls[-1]["response_format"] == upsampler.response_format
    # An endpoint that refuses response_format is asked without it (the reply is still checked).
    upsampler = Upsampler("text2video", endpoint_completer(url, "no-formats", None))
    assert upsampler.upsample("a cup")["subjects"] == VALID["subjects"]
    assert "response_format" in app.state.calls[-2] and "response_format" not in app.state.calls[-1]
    # Seed 000's variables name the endpoint when the arguments do not.
    monkeypatch.setenv("PROMPT_UPSAMPLER_ENDPOINT_URL", url)
    monkeypatch.setenv("PROMPT_UPSAMPLER_MODEL_NAME", "valid")
    monkeypatch.setenv("PROMPT_UPSAMPLER_API_TOKEN", "tok")
    Upsampler("text2video", endpoint_completer()).upsample("a dog")
    assert app.state.calls[-1]["model"] == "valid" and app.state.calls[-1]["seed"] == 3407
    monkeypatch.delenv("PROMPT_UPSAMPLER_MODEL_NAME")
    with pytest.raises(cosmos3.RequestError, match="PROMPT_UPSAMPLER_MODEL_NAME"):
        endpoint_completer(url)
