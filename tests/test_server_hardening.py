"""The server's hardening (issue items 1-10): bounded inputs, URL fetching, body and prompt limits, determinism,
a free event loop, shutdown and cancellation, client-input errors, slow clients, seeds and seconds."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import test_server as base
from fastapi.testclient import TestClient
from test_server import SMALL, Gate, LiveServer, mp4_bytes, png_bytes, wait_job, wait_until

import cosmos3.media
from cosmos3.server.app import create_app

engine, settings, client, live = base.engine, base.settings, base.client, base.live  # the shared fixtures


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` (its pixel data is a stub: enough to be refused before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def error_of(r, status=400):
    assert r.status_code == status, r.text
    return r.json()["error"]


class MediaHost:
    """A local HTTP server for URL tests: /image.png, /slow (trickles), /redirect?to=URL, /missing (404)."""

    def __init__(self):
        image = png_bytes(64, 48)
        self.slow_started = slow_started = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/image.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                elif self.path == "/slow":
                    slow_started.set()
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(200):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b"secret internal page")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture()
def host():
    h = MediaHost()
    yield h
    h.close()


def i2v(client, url: str):
    return client.post(
        "/predict",
        json={"model_mode": "image2video", "prompt": "a", "vision_path": url, "num_frames": 5, "resolution": "256"},
    )


# ------------------------------------------------------------------------------ 1. every decoded input is bounded
def test_inputs_are_bounded_in_bytes_pixels_frames_and_duration(client, settings):
    limits = settings.limits
    limits.max_input_pixels, limits.max_input_frames, limits.max_input_seconds = 100 * 100, 12, 10
    video = {"data": {"prompt": "a", **SMALL}}
    r = client.post("/v1/videos/sync", **video, files={"input_reference": ("a.png", png_bytes(120, 90), "image/png")})
    assert error_of(r)["param"] == "input_reference" and "pixels" in r.json()["error"]["message"]
    r = client.post("/v1/videos/sync", **video, files={"input_reference": ("a.mp4", mp4_bytes(frames=13), "video/mp4")})
    assert error_of(r)["param"] == "input_reference" and "frames" in r.json()["error"]["message"]
    r = client.post(  # 11 frames at 1 fps: 11 s
        "/v1/videos/sync", **video, files={"input_reference": ("a.mp4", mp4_bytes(frames=11, fps=1), "video/mp4")}
    )
    assert error_of(r)["param"] == "input_reference" and "too long" in r.json()["error"]["message"]
    # Data URIs count against the upload limit, before they are decoded.
    limits.max_upload_bytes = 2000
    r = i2v(client, data_uri(png_bytes(60, 60)))
    assert error_of(r, 413)["param"] == "vision_path"
    ref = json.dumps({"image_url": data_uri(png_bytes(60, 60))})
    assert error_of(client.post("/v1/videos/sync", data={**video["data"], "image_reference": ref}), 413)


# ------------------------------------------------------------------------------ 2. URLs: off the loop, bounded
def test_private_addresses_are_refused_unless_allowed(client, settings, host):
    for url in (f"{host.url}/image.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]:9/x.png"):
        error = error_of(i2v(client, url))
        assert error["param"] == "vision_path" and "non-public address" in error["message"], error
    settings.allow_private_urls = True
    r = i2v(client, f"{host.url}/image.png")
    assert r.status_code == 200, r.text


def test_redirects_are_checked_again(client, host, monkeypatch):
    # 127.0.0.1 counts as public here; the redirect target 127.0.0.2 does not.
    monkeypatch.setattr(cosmos3.media, "is_public_address", lambda ip: ip == "127.0.0.1")
    port = host.url.rsplit(":", 1)[1]
    error = error_of(i2v(client, f"{host.url}/redirect?to=http://127.0.0.2:{port}/image.png"))
    assert "after a redirect" in error["message"]


def test_url_errors_say_nothing_about_the_remote_side(client, settings, host):
    settings.allow_private_urls = True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.png"
    messages = set()
    for url in (f"{host.url}/missing", closed):
        error = error_of(i2v(client, url))
        assert "secret" not in error["message"]
        messages.add(error["message"].replace(url, "URL"))
    assert len(messages) == 1  # a 404 and a closed port read the same


def test_a_slow_url_has_a_total_deadline_and_does_not_block_other_routes(engine, settings, host):
    settings.allow_private_urls, settings.fetch_timeout_s = True, 1.0
    server = LiveServer(engine, settings)
    try:
        result = {}
        started = time.monotonic()
        thread = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{server.url}/predict", json=_i2v_body(f"{host.url}/slow"), timeout=30)
            )
        )
        thread.start()
        assert host.slow_started.wait(10)  # the fetch is under way (the URL trickles a byte every 50 ms)
        t0 = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
        thread.join(30)
        assert result["r"].status_code == 400 and result["r"].json()["error"]["param"] == "vision_path"
        assert time.monotonic() - started < 5  # 1 s deadline in total, though every read was quick
    finally:
        server.stop()


def _i2v_body(url):
    return {"model_mode": "image2video", "prompt": "a", "vision_path": url, "num_frames": 5, "resolution": "256"}


# ------------------------------------------------------------------------------ 3. body and prompt length
def test_body_and_prompt_length_are_capped(client, settings):
    settings.limits.max_prompt_chars = 100
    for path, body in (
        ("/v1/images/generations", {"prompt": "x" * 101, "size": "64x48"}),
        ("/predict", {"model_mode": "text2image", "prompt": "x" * 101, "resolution": "256"}),
    ):
        assert error_of(client.post(path, json=body))["param"] == "prompt"
    assert error_of(client.post("/v1/videos/sync", data={"prompt": "x" * 101, **SMALL}))["param"] == "prompt"
    settings.limits.max_body_bytes = 1000
    assert error_of(client.post("/predict", json={"prompt": "x" * 2000}), 413)

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = client.post("/predict", content=chunked(), headers={"Content-Type": "application/json"})
    assert error_of(r, 413)


# ------------------------------------------------------------------------------ 4. the same request, the same bytes
def test_the_same_request_gives_the_same_output_on_every_route(client):
    video = {"prompt": "a lab", "size": "64x48", "num_frames": "5", "num_inference_steps": "2", "seed": "7"}
    outputs = [client.post("/v1/videos/sync", data=video).content for _ in range(2)]
    job = client.post("/v1/videos", data=video).json()
    wait_job(client, job["id"])
    outputs.append(client.get(f"/v1/videos/{job['id']}/content").content)
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 100
    image = {"prompt": "a lab", "size": "64x48", "num_inference_steps": 2, "seed": 7}
    a, b = (client.post("/v1/images/generations", json=image).json()["data"][0]["b64_json"] for _ in range(2))
    assert a == b
    predict = {"model_mode": "text2video", "prompt": "a lab", "resolution": "256", "num_frames": 5, "num_steps": 2}
    a, b = (client.post("/predict", json={**predict, "aspect_ratio": "4,3"}).json()["data"] for _ in range(2))
    assert a == b


# ------------------------------------------------------------------------------ 5. the event loop stays free
def test_health_answers_while_a_streaming_chat_waits_for_a_video(engine, live, monkeypatch):
    gate = Gate(engine, monkeypatch)
    job = httpx.post(f"{live.url}/v1/videos", data={"prompt": "a", **SMALL}).json()
    assert gate.entered.wait(30)  # the video job holds the engine, inside a step
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    result = {}
    chat = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60))
    )
    chat.start()
    wait_until(lambda: live.app.state.worker.waiting_for_engine == 1)  # the conversation waits for the engine
    for path in ("/health", f"/v1/videos/{job['id']}", "/v1/models"):
        t0 = time.monotonic()
        assert httpx.get(f"{live.url}{path}", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0, path
    gate.open()
    chat.join(60)
    assert result["r"].status_code == 200 and result["r"].text.rstrip().endswith("data: [DONE]")


# ------------------------------------------------------------------------------ 6. shutdown and cancellation
def test_shutdown_mid_step_is_quick_and_marks_the_job_interrupted(engine, settings, monkeypatch):
    import signal

    gate = Gate(engine, monkeypatch)
    server = LiveServer(engine, settings)
    job = httpx.post(f"{server.url}/v1/videos", data={"prompt": "a", **SMALL}).json()
    assert gate.entered.wait(30)  # a step that does not end
    started = time.monotonic()
    server.server.handle_exit(signal.SIGTERM, None)
    server.thread.join(20)
    assert not server.thread.is_alive() and time.monotonic() - started < 8
    stored = server.app.state.store.get(job["id"])
    assert stored.status == "failed" and "interrupted by a server shutdown" in stored.error["message"]
    gate.open()  # the step ends later: the record stays as the shutdown left it
    server.app.state.worker._threads[0].join(30)
    assert server.app.state.store.get(job["id"]).status == "failed"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        ("/predict", {"model_mode": "reasoner", "prompt": "hi", "max_tokens": 4}),
    ],
    ids=["chat-stream", "chat", "predict-reasoner"],
)
def test_a_conversation_whose_client_left_gives_the_engine_back(engine, live, monkeypatch, route, body):
    """The client gives up while a video holds the engine: its conversation leaves before any prefill, streamed or
    not (a non-streamed route is not cancelled by Starlette when its client leaves: `unless_gone` does it)."""
    from cosmos3.reasoning.scheduler import Scheduler

    gate = Gate(engine, monkeypatch)
    prefills = []
    for name in ("prefill_whole", "prefill_part"):
        original = getattr(Scheduler, name)
        monkeypatch.setattr(Scheduler, name, lambda self, *a, _o=original, **k: prefills.append(1) or _o(self, *a, **k))
    httpx.post(f"{live.url}/v1/videos", data={"prompt": "a", **SMALL})
    assert gate.entered.wait(30)
    with pytest.raises(httpx.ReadTimeout):  # gives up while the video holds the engine
        httpx.post(f"{live.url}{route}", json=body, timeout=httpx.Timeout(30, read=1.0))
    conversations = live.app.state.conversations
    time.sleep(0.5)  # the server notices the disconnect
    gate.open()
    wait_until(lambda: conversations.pending == 0)
    wait_until(lambda: not live.app.state.worker.engine_lock.locked())
    assert prefills == []


@pytest.mark.parametrize("route", ["/v1/videos/sync", "/predict"])
def test_a_client_that_disconnects_cancels_its_job(engine, live, monkeypatch, route):
    gate = Gate(engine, monkeypatch)
    kwargs = (
        {"data": {"prompt": "a", **SMALL}}
        if route == "/v1/videos/sync"
        else {"json": {"model_mode": "text2video", "prompt": "a", "resolution": "256", "num_frames": 5, "num_steps": 2}}
    )
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}{route}", timeout=httpx.Timeout(30, read=1.0), **kwargs)  # gives up, closes
    store = live.app.state.store
    wait_until(lambda: [j.status for j in store.list()] == ["cancelling"])
    gate.open()
    (job,) = store.list()
    assert live.app.state.worker.wait(job.id, 30).status == "cancelled"


def test_n_larger_than_the_free_queue_is_all_or_nothing(engine, settings):
    settings.max_queue = 3
    with TestClient(create_app(engine, settings)) as client:
        worker, store = client.app.state.worker, client.app.state.store
        worker.pause()
        for prompt in ("a", "b"):
            assert client.post("/v1/videos", data={"prompt": prompt, **SMALL}).status_code == 200
        r = client.post("/v1/images/generations", json={"prompt": "c", "size": "64x48", "n": 2})
        assert r.status_code == 429
        assert [j.dialect for j in store.list()] == ["videos", "videos"]  # no part of the batch was queued
        worker.resume()


def test_sigterm_stops_the_server_within_seconds(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from cosmos3.cli import main; raise SystemExit(main())", "serve", "--model", "tiny"]
    cmd += ["--port", str(port), "--jobs-db", str(tmp_path / "jobs.db"), "--outputs-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        long = {"prompt": "a", "size": "320x192", "num_frames": "33", "num_inference_steps": "200"}
        job = httpx.post(f"{url}/v1/videos", data=long, timeout=30).json()
        wait_until(lambda: httpx.get(f"{url}/v1/videos/{job['id']}").json()["progress"] > 0, timeout=60)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
    import sqlite3

    status, error = sqlite3.connect(tmp_path / "jobs.db").execute("SELECT status, error FROM jobs").fetchone()
    assert status == "failed" and "interrupted by a server shutdown" in json.loads(error)["message"]


# ------------------------------------------------------------------------------ 7. no 500s on client input
SURROGATE = '"\\ud800x"'  # JSON text for a lone surrogate followed by x


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/images/generations", f'{{"prompt": {SURROGATE}, "size": "64x48"}}', "prompt"),
        ("/predict", f'{{"model_mode": "text2image", "prompt": {SURROGATE}}}', "prompt"),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            f'{{"stream": true, "messages": [{{"role": "user", "content": [{{"type": "text", "text": {SURROGATE}}}]}}]'
            "}",
            "messages[0].content[0].text",
        ),
        ("/v1/images/generations", f'{{"prompt": "a", "extra_params": {{"guardrails": {SURROGATE}}}}}', None),
    ],
)
def test_lone_surrogates_are_400(client, path, body, param):
    error = error_of(client.post(path, content=body, headers={"Content-Type": "application/json"}))
    assert param is None or error["param"] == param


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"video": "x"}, "media_io_kwargs.video"),
        ({"video": {"fps": "fast"}}, "media_io_kwargs.video.fps"),
        ({"video": {"num_frames": [1]}}, "media_io_kwargs.video.num_frames"),
        ({"video": {"bogus": 1}}, "media_io_kwargs.video.bogus"),
        ([1], "media_io_kwargs"),
    ],
)
def test_media_io_kwargs_of_the_wrong_type_are_400(client, kwargs, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "media_io_kwargs": kwargs}
    assert error_of(client.post("/v1/chat/completions", json=body))["param"] == param


def test_a_removed_output_file_is_404_not_500(client):
    job = client.post("/v1/videos", data={"prompt": "a", **SMALL}).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "completed"
    for path in client.app.state.store.get(job["id"]).outputs:
        __import__("os").remove(path)
    assert error_of(client.get(f"/v1/videos/{job['id']}/content"), 404)["type"] == "NotFoundError"


# ------------------------------------------------------------------------------ 8. media errors name the problem
@pytest.mark.parametrize(
    ("vision_path", "words"),
    [
        ("data:image/png;base64,not*base64!", "not valid base64"),
        (data_uri(np.random.default_rng(0).bytes(3000), "application/octet-stream"), "neither an image nor a video"),
        (data_uri(png_header(20000, 20000)), "too large"),
        (data_uri(png_bytes(64, 48)[:200]), "cannot be decoded"),
    ],
)
def test_predict_media_errors_name_the_field_and_the_problem(client, vision_path, words):
    error = error_of(i2v(client, vision_path))
    assert error["param"] == "vision_path" and words in error["message"], error
    assert "missing" not in error["message"]


def test_media_errors_show_no_server_path(client, settings):
    r = client.post(
        "/v1/videos/sync",
        data={"prompt": "a", **SMALL},
        files={"input_reference": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")},
    )
    error = error_of(r)
    assert error["param"] == "input_reference"
    assert str(settings.outputs_dir) not in error["message"] and "/tmp" not in error["message"]


# ------------------------------------------------------------------------------ 9. slow clients time out
def test_slow_headers_and_partial_bodies_time_out(engine, settings):
    settings.header_timeout_s, settings.body_idle_timeout_s = 0.5, 0.5
    server = LiveServer(engine, settings)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server
            assert time.monotonic() - t0 < 5
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            head = (
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            s.sendall(head + b'{"prompt": "')  # the body stops coming
            assert s.recv(1024).startswith(b"HTTP/1.1 408")
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()


# ------------------------------------------------------------------------------ 10. seconds and seeds
def test_every_reply_says_its_seed_and_the_job_its_seconds(client):
    job = client.post("/v1/videos", data={"prompt": "a", **SMALL, "fps": "24"}).json()
    assert job["seconds"] == "0.375" and job["seed"] == 42  # 9 frames at 24 fps; vLLM-Omni's default seed
    job = client.post(
        "/v1/videos", data={"prompt": "a", "size": "64x48", "seconds": "1", "fps": "10", "num_inference_steps": "1"}
    ).json()
    assert job["seconds"] == "1" and job["num_frames"] == 13  # 10 frames rounded up to 4k+1
    r = client.post("/v1/images/generations", json={"prompt": "a", "size": "64x48", "num_inference_steps": 1, "n": 2})
    data = r.json()
    assert [d["seed"] for d in data["data"]] == [data["seed"], data["seed"] + 1]
    r = client.post("/predict", json={"model_mode": "text2image", "prompt": "a", "resolution": "256", "num_steps": 1})
    assert r.json()["seed"] == 0  # the hosted examples' seed
    r = client.post("/v1/videos/sync", data={"prompt": "a", **SMALL, "seed": "5"})
    assert r.headers["X-Seed"] == "5"


@pytest.mark.parametrize("fps", ["nan", "inf", "-inf"])
def test_seconds_with_a_non_finite_fps_is_a_400_naming_fps(client, fps):
    r = client.post("/v1/videos/sync", data={"prompt": "x", "size": "320x192", "seconds": "1", "fps": fps})
    assert error_of(r)["param"] == "fps"


def test_json_nested_past_the_recursion_limit_is_a_400(client):
    deep = "[" * 100_000 + "]" * 100_000
    r = client.post("/v1/videos/sync", data={"prompt": "x", "size": "320x192", "extra_params": '{"a": ' + deep + "}"})
    error = error_of(r)
    assert error["param"] == "extra_params" and "nested too deeply" in error["message"]
    action = data_uri(deep.encode(), "application/json")
    body = {"model_mode": "forward_dynamics", "prompt": "x", "vision_path": data_uri(png_bytes(64, 48))}
    r = client.post("/predict", json={**body, "action_path": action})
    assert error_of(r)["param"] == "action_path"


def test_an_unexpected_error_is_a_500_and_the_connection_stays_usable(live, monkeypatch):
    """Starlette's outermost handler answers 500 and then re-raises, and uvicorn resets the connection: the
    client's next keep-alive request failed. The Guard answers it instead."""
    import cosmos3.server.videos as videos

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(videos, "queue_video", broken)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        r = http.post("/v1/videos/sync", data={"prompt": "x", "size": "320x192"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: ZeroDivisionError"
        assert http.get("/health").status_code == 200  # the same connection


def test_a_body_that_is_not_json_is_a_400_saying_where(client):
    r = client.post("/predict", content=b'{"model_mode":', headers={"Content-Type": "application/json"})
    error = error_of(r)
    assert error["param"] is None  # not the character offset
    assert error["message"].startswith("the request body is not valid JSON") and "at character 14" in error["message"]


@pytest.mark.parametrize("value", ["nan", "inf", "99"])
def test_a_sound_duration_off_the_video_s_length_is_a_400(client, value):
    r = client.post("/v1/videos/sync", data={"prompt": "x", **SMALL, "sound_duration": value})
    assert error_of(r)["param"] == "sound_duration"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/videos/sync", {"data": {"prompt": "x", **SMALL, "width": "96"}}, "size"),
        ("/v1/videos/sync", {"data": {"prompt": "x", **SMALL, "extra_params": '{"height": 64}'}}, "size"),
        ("/v1/images/generations", {"json": {"prompt": "x", "size": "64x48", "extra_params": {"width": 96}}}, "size"),
        (
            "/v1/images/generations",
            {"json": {"prompt": "x", "num_inference_steps": 1, "extra_args": {"num_steps": 2}}},
            "num_inference_steps",
        ),
    ],
)
def test_one_field_sent_twice_with_two_values_is_a_400_not_a_silent_choice(client, path, body, param):
    error = error_of(client.post(path, **body))
    assert error["param"] == param and "disagrees with" in error["message"]


def test_one_field_sent_twice_with_one_value_is_accepted(client):
    r = client.post("/v1/videos/sync", data={"prompt": "x", **SMALL, "width": "64", "extra_params": '{"height": 48}'})
    assert r.status_code == 200, r.text


def test_an_empty_prompt_is_a_prompt_on_every_route_and_a_missing_one_is_named(client):
    assert client.post("/v1/videos/sync", data={"prompt": "", **SMALL}).status_code == 200
    r = client.post("/v1/images/generations", json={"prompt": "", "size": "64x48", "num_inference_steps": 1})
    assert r.status_code == 200
    error = error_of(client.post("/v1/videos/sync", data=SMALL))
    assert error["param"] == "prompt" and "required" in error["message"]


def test_n_images_from_the_largest_seed_wrap_as_chat_choices_do(client):
    body = {"prompt": "a", "size": "64x48", "num_inference_steps": 1, "n": 2, "seed": 2**63 - 1}
    data = client.post("/v1/images/generations", json=body).json()
    assert [d["seed"] for d in data["data"]] == [2**63 - 1, 0]
    error = error_of(client.post("/v1/images/generations", json={**body, "seed": 2**63}))
    assert error["param"] == "seed" and str(2**63) in error["message"]


def test_head_health_and_405s_that_list_the_allowed_methods(client):
    assert client.head("/health").status_code == 200  # some health checkers send HEAD
    r = client.post("/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    r = client.put("/v1/videos")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.put("/v1/videos/sync")  # the literal path, not /v1/videos/{video_id}
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_two_authorization_headers_are_refused_whatever_their_order(engine, settings):
    """Over a real connection (a test client joins repeated headers into one)."""
    settings.api_key = "s3cret"
    server = LiveServer(engine, settings)
    try:
        for keys in (["Bearer wrong", "Bearer s3cret"], ["Bearer s3cret", "Bearer wrong"]):
            lines = "".join(f"Authorization: {k}\r\n" for k in keys)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{lines}Connection: close\r\n\r\n".encode())
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 400") and b"one Authorization header" in reply, reply[:300]
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        server.stop()


def test_a_page_after_an_unknown_job_is_a_404_not_the_end_of_the_list(client):
    job = client.post("/v1/videos", data={"prompt": "a", **SMALL}).json()
    assert client.get("/v1/videos", params={"after": job["id"]}).status_code == 200
    error = error_of(client.get("/v1/videos", params={"after": "video_gone"}), 404)
    assert error["param"] == "after" and "video_gone" in error["message"]


def test_predict_takes_the_tier_under_either_name_and_refuses_two_values(client):
    body = {"model_mode": "text2image", "prompt": "a", "num_steps": 1, "aspect_ratio": "1,1"}
    r = client.post("/predict", json={**body, "image_size": 256})
    assert r.status_code == 200, r.text  # was silently the default 480 tier (over this test's pixel limit: a 400)
    error = error_of(client.post("/predict", json={**body, "image_size": 256, "resolution": "480"}))
    assert error["param"] == "image_size" and "disagrees" in error["message"]
    policy = {"model_mode": "policy", "prompt": "a", "num_steps": 1, "domain_name": "bridge_orig_lerobot"}
    r = client.post("/predict", json={**policy, "resolution": "256", "vision_path": data_uri(png_bytes(64, 48))})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/predict", {"model_mode": "policy", "prompt": "p", "domain_name": "pusht", "action_chunk_size": True},
         "action_chunk_size"),
        ("/v1/images/generations", {"prompt": "p", "n": True}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ],
)  # fmt: skip
def test_a_boolean_is_not_an_integer_on_any_json_route(client, path, body, param):
    """pydantic's lax mode read `true` as 1: a flag sent to the wrong field became a count."""
    error = error_of(client.post(path, json=body))
    assert error["param"] == param and "boolean" in error["message"]


def test_predict_refuses_action_fields_in_a_vision_mode(client):
    body = {"model_mode": "text2image", "prompt": "a", "resolution": "256", "num_steps": 1, "aspect_ratio": "1,1"}
    for field, value in (("action_chunk_size", 8), ("raw_action_dim", 7)):
        error = error_of(client.post("/predict", json={**body, field: value}))
        assert error["param"] == field and "only with mode in" in error["message"]
