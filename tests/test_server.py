"""The HTTP server on the tiny model: both dialects, jobs, restarts, limits, auth and media rules.

Tests synchronise with the worker through its hooks (`pause`/`resume`, a gate on the engine's steps), never by
sleeping or by holding the engine's lock. The helpers here are shared by tests/test_server_*.py."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import cosmos3
from cosmos3.loading.tiny import write_pipeline
from cosmos3.server.app import Settings, create_app
from cosmos3.server.limits import Limits
from cosmos3.server.serve import build_server


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return cosmos3.load(write_pipeline(tmp_path_factory.mktemp("tiny"), seed=4))


@pytest.fixture()
def settings(tmp_path) -> Settings:
    media = tmp_path / "media"
    media.mkdir()
    return Settings(
        model_name="cosmos3-tiny",
        jobs_db=tmp_path / "jobs.db",
        outputs_dir=tmp_path / "outputs",
        allowed_local_media_path=media,
        sync_timeout_s=120,
        abort_timeout_s=0.2,
        shutdown_grace_s=1.0,
        graceful_shutdown_s=1.0,
        limits=Limits(max_frames=33, max_pixels=320 * 256),
    )


@pytest.fixture()
def client(engine, settings):
    with TestClient(create_app(engine, settings)) as c:
        yield c


def png_bytes(w=80, h=60, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mp4_bytes(frames=9, w=64, h=48, fps=8) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        rng = np.random.default_rng(1)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def frames_of(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


SMALL = {"size": "64x48", "num_frames": "9", "num_inference_steps": "2"}


def wait_job(client, job_id, timeout=120):
    """The job once it is final (the worker's own wait: no polling)."""
    job = client.app.state.worker.wait(job_id, timeout)
    assert job is not None, "job did not finish"
    return client.get(f"/v1/videos/{job_id}").json()


def wait_until(condition, timeout=30.0):
    """Poll a condition of the server's state (not a sleep-based synchronisation: it returns as soon as it holds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class Gate:
    """Holds every denoising step of the engine until `open()`: a job stays in_progress, inside a step, as long as
    a test needs it (a step that takes minutes on a real model)."""

    def __init__(self, engine, monkeypatch):
        self.opened, self.entered = threading.Event(), threading.Event()
        original = engine.generate_batch

        def gated(requests, on_steps=None):
            return original(requests, [self._wrap(f) for f in (on_steps or [None] * len(requests))])

        monkeypatch.setattr(engine, "generate_batch", gated)

    def _wrap(self, on_step):
        def wrapped(i, n):
            self.entered.set()
            self.opened.wait(120)
            if on_step is not None:
                on_step(i, n)

        return wrapped

    def open(self):
        self.opened.set()


# ------------------------------------------------------------------------------------------- OpenAI clients
class LiveServer:
    """A real uvicorn server (cosmos3's configuration) in a thread, on a free port."""

    def __init__(self, engine, settings):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(engine, settings)
        self.server = build_server(self.app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def live(engine, settings):
    server = LiveServer(engine, settings)
    yield server
    server.stop()


@pytest.fixture()
def live_server(live):
    return live.url


def test_openai_client_images_and_chat(live_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live_server}/v1", api_key="unused")
    assert client.models.list().data[0].id == "cosmos3-tiny"
    image = client.images.generate(
        model="cosmos3-tiny", prompt="a red cup", size="64x48", n=2, extra_body={"num_inference_steps": 2, "seed": 3}
    )
    assert len(image.data) == 2
    first = Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json)))
    assert first.size == (64, 48) and first.format == "PNG"

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()},
                },
                {"type": "text", "text": "Describe the image."},
            ],
        },
    ]
    reply = client.chat.completions.create(model="cosmos3-tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 10
    stream = client.chat.completions.create(
        model="cosmos3-tiny", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == reply.choices[0].message.content


# ------------------------------------------------------------------------------------------- videos
def test_sync_video_text_and_image_reference(client):
    r = client.post("/v1/videos/sync", data={"prompt": "a robot", **SMALL})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert frames_of(r.content) == 9
    r = client.post(
        "/v1/videos/sync",
        data={"prompt": "a robot", **SMALL, "generate_sound": "true"},
        files={"input_reference": ("first.png", png_bytes(), "image/png")},
    )
    assert r.status_code == 200
    with av.open(io.BytesIO(r.content)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"


def test_async_job_lifecycle_and_policy_actions(client):
    extra = {"action_mode": "policy", "domain_name": "pusht", "action_chunk_size": 4, "image_size": "256"}
    r = client.post(
        "/v1/videos",
        data={"prompt": "push the block", "num_inference_steps": "2", "extra_params": json.dumps(extra)},
        files={"input_reference": ("obs.png", png_bytes(96, 64), "image/png")},
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] in ("queued", "in_progress") and job["id"].startswith("video_gen_")
    done = wait_job(client, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["action"]["shape"] == [4, 2] and len(done["action"]["data"]) == 4
    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and frames_of(content.content) == 5
    listed = client.get("/v1/videos").json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == job["id"]
    deleted = client.delete(f"/v1/videos/{job['id']}").json()
    assert deleted == {"id": job["id"], "deleted": True, "object": "video.deleted"}
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404


def test_cancel_running_and_queued_jobs(engine, client, monkeypatch):
    gate = Gate(engine, monkeypatch)
    first = client.post("/v1/videos", data={"prompt": "a", **SMALL}).json()
    assert gate.entered.wait(30)  # the worker is inside the first job's first step
    second = client.post("/v1/videos", data={"prompt": "b", **SMALL}).json()
    assert client.get(f"/v1/videos/{second['id']}").json()["status"] == "queued"
    # A running job is not deleted at once: it is cancelling until it reaches its next step (409, as vLLM-Omni).
    r = client.delete(f"/v1/videos/{first['id']}")
    assert r.status_code == 409 and r.json()["error"]["type"] == "ConflictError"
    assert client.get(f"/v1/videos/{first['id']}").json()["status"] == "cancelling"
    assert client.get(f"/v1/videos/{first['id']}/content").status_code == 404
    # A queued job is cancelled and removed at once.
    assert client.delete(f"/v1/videos/{second['id']}").json()["deleted"] is True
    assert client.get(f"/v1/videos/{second['id']}").status_code == 404
    gate.open()
    assert wait_job(client, first["id"])["status"] == "cancelled"  # stopped at its first step
    assert client.get(f"/v1/videos/{first['id']}/content").status_code == 422
    assert client.delete(f"/v1/videos/{first['id']}").json() == {
        "id": first["id"],
        "deleted": True,
        "object": "video.deleted",
    }
    assert client.get(f"/v1/videos/{first['id']}").status_code == 404


def test_full_queue_answers_429(engine, settings):
    settings.max_queue = 1
    with TestClient(create_app(engine, settings)) as client:
        client.app.state.worker.pause()  # jobs stay queued
        assert client.post("/v1/videos", data={"prompt": "a", **SMALL}).status_code == 200
        r = client.post("/v1/videos", data={"prompt": "b", **SMALL})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["type"] == "RateLimitError"
        client.app.state.worker.resume()


def test_restart_keeps_finished_jobs_and_handles_interrupted_ones(engine, settings):
    with TestClient(create_app(engine, settings)) as client:
        job = client.post("/v1/videos", data={"prompt": "a", **SMALL}).json()
        assert wait_job(client, job["id"])["status"] == "completed"
        store = client.app.state.store
        queued = client.post("/v1/videos", data={"prompt": "b", **SMALL}).json()
        wait_job(client, queued["id"])
        # Simulate a crash mid-run and a job that never started.
        store.update(queued["id"], status="in_progress")
        from cosmos3.server.jobs import Job

        store.add(
            Job(id="video_gen_pending", dialect="videos", request=store.get(job["id"]).request, info={"prompt": "c"})
        )
    with TestClient(create_app(engine, settings)) as client:
        assert client.get(f"/v1/videos/{job['id']}").json()["status"] == "completed"
        assert frames_of(client.get(f"/v1/videos/{job['id']}/content").content) == 9
        interrupted = client.get(f"/v1/videos/{queued['id']}")
        assert interrupted.status_code == 500 and "restart" in interrupted.json()["error"]["message"]
        assert wait_job(client, "video_gen_pending")["status"] == "completed"


# ------------------------------------------------------------------------------------------- /predict
def test_predict_six_modes(client, settings):
    media = settings.allowed_local_media_path
    (media / "first.png").write_bytes(png_bytes(96, 64))
    (media / "clip.mp4").write_bytes(mp4_bytes(frames=9, w=96, h=64))
    (media / "actions.json").write_text(json.dumps(np.zeros((4, 2)).tolist()))
    common = {"seed": 0, "num_steps": 2}
    cases = {
        "text2image": {"resolution": "256", "aspect_ratio": "1,1", "num_frames": 1},
        "text2video": {"resolution": "256", "aspect_ratio": "4,3", "num_frames": 5, "fps": 24},
        "image2video": {
            "vision_path": str(media / "first.png"),
            "resolution": "256",
            "aspect_ratio": "4,3",
            "num_frames": 5,
        },
        "forward_dynamics": {
            "vision_path": str(media / "clip.mp4"),
            "action_path": str(media / "actions.json"),
            "image_size": 256,
            "action_chunk_size": 4,
            "domain_name": "pusht",
            "fps": 5,
        },
        "inverse_dynamics": {
            "vision_path": str(media / "clip.mp4"),
            "image_size": 256,
            "action_chunk_size": 4,
            "domain_name": "pusht",
            "raw_action_dim": 2,
            "fps": 10,
        },
        "policy": {
            "vision_path": str(media / "clip.mp4"),
            "image_size": 256,
            "action_chunk_size": 4,
            "domain_name": "pusht",
            "fps": 5,
        },
    }
    settings.limits.max_pixels = 256 * 320
    for mode, fields in cases.items():
        r = client.post("/predict", json={"model_mode": mode, "prompt": "a robot", **common, **fields})
        assert r.status_code == 200, (mode, r.text)
        out = r.json()
        assert out["model_mode"] == mode and out["name"]
        assert out["format"] == ("jpg" if mode == "text2image" else "mp4")
        assert len(base64.b64decode(out["data"])) > 100
        if mode in ("policy", "inverse_dynamics"):
            action = out["sample_outputs"]["outputs"][0]["content"]["action"]
            assert np.asarray(action).shape == (4, 2)
        else:
            assert "sample_outputs" not in out


# ------------------------------------------------------------------------------------------- errors, security
@pytest.mark.parametrize(
    ("path", "kwargs", "param"),
    [
        ("/v1/videos/sync", {"data": {"prompt": "a", **SMALL, "fps": "12"}}, "fps"),
        ("/v1/videos/sync", {"data": {"prompt": "a", **SMALL, "extra_params": "{not json"}}, "extra_params"),
        ("/v1/videos/sync", {"data": {"prompt": "a", **SMALL, "extra_params": '{"bogus": 1}'}}, "extra_params.bogus"),
        ("/v1/videos/sync", {"data": {"prompt": "a", **SMALL, "quality": "hd"}}, "quality"),
        ("/v1/videos/sync", {"data": {"prompt": "a", **SMALL, "model": "other"}}, "model"),
        ("/v1/videos/sync", {"data": {"prompt": "a", **SMALL, "size": "1024x1024"}}, "size"),
        (
            "/v1/videos/sync",
            {
                "data": {
                    "prompt": "a",
                    "extra_params": json.dumps({"action_mode": "policy", "domain_name": "atlantis"}),
                },
                "files": {"input_reference": ("x.png", png_bytes(), "image/png")},
            },
            "extra_params.domain_name",
        ),
        ("/v1/images/generations", {"json": {"prompt": "a", "n": 11}}, "n"),
        ("/v1/images/generations", {"json": {"prompt": "a", "size": "64x48", "stray": 1}}, "stray"),
        (
            "/predict",
            {"json": {"model_mode": "text2video", "prompt": "a", "vision_path": "/etc/passwd"}},
            "vision_path",
        ),
        ("/predict", {"json": {"model_mode": "image2video", "prompt": "a"}}, "vision_path"),
        ("/v1/chat/completions", {"json": {"messages": []}}, "messages"),
        (
            "/v1/chat/completions",
            {"json": {"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": "x"}]}]}},
            "messages[0].content[0].type",
        ),
        (
            "/v1/chat/completions",
            {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}},
            "max_tokens",
        ),
    ],
)
def test_invalid_fields_are_400_with_the_field_named(client, path, kwargs, param):
    r = client.post(path, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_unknown_job_is_404(client):
    r = client.get("/v1/videos/video_gen_nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "video_id"


def test_api_key(engine, settings):
    settings.api_key = "s3cret"
    with TestClient(create_app(engine, settings)) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/v1/models")
        assert r.status_code == 401 and "error" in r.json()
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/predict", json={"model_mode": "text2image", "prompt": "x"}).status_code == 401
        r = client.post(
            "/predict",
            headers={"Authorization": "Api-Key s3cret"},
            json={"model_mode": "text2image", "prompt": "x", "resolution": "480", "num_steps": 1},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "resolution"  # 640x640: over this test's limit


def test_local_paths_stay_under_the_allowed_folder(client, settings, tmp_path):
    media = settings.allowed_local_media_path
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (media / "link.png").symlink_to(outside)
    for path in (str(media / ".." / "secret.png"), str(media / "link.png"), str(outside)):
        r = client.post(
            "/predict",
            json={
                "model_mode": "image2video",
                "prompt": "a",
                "vision_path": path,
                "num_frames": 5,
                "resolution": "256",
            },
        )
        assert r.status_code == 400 and "outside the allowed media folder" in r.json()["error"]["message"]
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{outside}"}}]}
            ]
        },
    )
    assert r.status_code == 400


def test_no_local_paths_without_an_allowed_folder(engine, settings):
    settings.allowed_local_media_path = None
    with TestClient(create_app(engine, settings)) as client:
        r = client.post("/predict", json={"model_mode": "image2video", "prompt": "a", "vision_path": __file__})
        assert r.status_code == 400 and "local path" in r.json()["error"]["message"]


def test_oversized_upload_is_413(engine, settings):
    settings.limits.max_upload_bytes = 1000
    with TestClient(create_app(engine, settings)) as client:
        r = client.post(
            "/v1/videos/sync",
            data={"prompt": "a", **SMALL},
            files={"input_reference": ("big.png", png_bytes(200, 200), "image/png")},
        )
        assert r.status_code == 413 and r.json()["error"]["param"] == "input_reference"


def test_a_failing_job_does_not_stop_the_server(client, monkeypatch):
    original = client.app.state.engine.generate_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("GPU fell over")
        return original(*args, **kwargs)

    monkeypatch.setattr(client.app.state.engine, "generate_batch", flaky)
    r = client.post("/v1/videos/sync", data={"prompt": "a", **SMALL})
    assert r.status_code == 500 and "GPU fell over" in r.json()["error"]["message"]
    assert client.post("/v1/videos/sync", data={"prompt": "a", **SMALL}).status_code == 200


def test_outputs_expire_after_retention(engine, settings):
    settings.retention_s = 0.5
    with TestClient(create_app(engine, settings)) as client:
        job = client.post("/v1/videos", data={"prompt": "a", **SMALL}).json()
        wait_job(client, job["id"])
        wait_until(lambda: client.get(f"/v1/videos/{job['id']}").status_code == 404, timeout=10)
        assert not Path(settings.outputs_dir, job["id"]).exists()


def test_queued_requests_of_one_shape_share_passes(engine, settings, monkeypatch):
    settings.max_batch = 3
    with TestClient(create_app(engine, settings)) as client:
        calls = []
        original = engine.generate_batch

        def spy(reqs, on_steps=None):
            calls.append([r.prompt for r in reqs])
            return original(reqs, on_steps)

        monkeypatch.setattr(engine, "generate_batch", spy)
        worker = client.app.state.worker
        worker.pause()  # all five wait in the queue
        same = [
            client.post("/v1/videos", data={"prompt": p, **SMALL, "seed": str(i)}).json()
            for i, p in enumerate(["b", "c", "d"])
        ]
        other = client.post("/v1/videos", data={"prompt": "e", **SMALL, "size": "48x32"}).json()
        worker.resume()
        for job in (*same, other):
            assert wait_job(client, job["id"])["status"] == "completed"
        assert calls == [["b", "c", "d"], ["e"]]  # one shared pass set for the three compatible queued requests
        # Batching does not change a request's output.
        alone = client.post("/v1/videos/sync", data={"prompt": "c", **SMALL, "seed": "1"}).content
        batched = client.get(f"/v1/videos/{same[1]['id']}/content").content
        assert frames_of(alone) == frames_of(batched) == 9
