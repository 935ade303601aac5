"""The playground in a real browser: headless Chromium (the distribution's package) driven by Playwright against
`cosmos3 serve --ui` on the tiny model, served by uvicorn on a free localhost port.

Screenshots are kept under the test's tmp_path and, when COSMOS3_TEST_ARTIFACTS names a folder, copied there."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cosmos3
from cosmos3.server.app import Settings, create_app
from cosmos3.server.serve import build_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="chromium is not installed (Debian/Ubuntu: apt-get install chromium); the browser test needs it",
)
pytestmark = [  # gradio's queue on pandas 3
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:DeprecationWarning"),
]

RUN_S = 180_000  # ms: a generation on 2 CPU cores, with the page's first compile of every component


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny")


def playground(engine, root: Path):
    """What `cosmos3 serve --ui` builds: the HTTP API's app with the playground mounted at /ui."""
    from cosmos3.ui.app import mount

    settings = Settings(model_name="cosmos3-tiny", jobs_db=root / "jobs.db", outputs_dir=root / "outputs")
    app = create_app(engine, settings)
    mount(app, "/ui")
    return app


@pytest.fixture(scope="module")
def base_url(engine, tmp_path_factory):
    """The playground served by uvicorn (with the server's guards) on a free localhost port, in a thread."""
    app = playground(engine, tmp_path_factory.mktemp("ui"))
    port = free_port()
    server = build_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_action_plot_has_a_panel_per_channel_and_chunk_marks():
    from cosmos3.ui.plot import PANEL_H, plot_actions

    steps = np.linspace(-1, 1, 8)[:, None] * np.arange(1, 4)[None, :]
    image = plot_actions(steps, chunk_size=4, title="three channels")
    assert image.mode == "RGB" and image.height > 3 * PANEL_H
    pixels = np.asarray(image)
    assert (pixels != 255).any(axis=2).mean() > 0.02  # something is drawn
    assert plot_actions(np.zeros((0, 2))).size[0] > 0  # no steps: only the heading


def test_bridge_queues_jobs_on_the_server_worker(engine, tmp_path):
    """The playground's generations are the server's jobs: same resolution, same queue, same store."""
    from fastapi.testclient import TestClient

    from cosmos3.ui import bridge

    app = playground(engine, tmp_path)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        page = client.get("/ui/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        server = app.state.server
        fields = {"mode": "text2image", "prompt": "a cup", "width": 96, "height": 64, "num_steps": 1, "seed": 5}
        job = bridge.submit_generation(server, fields, {}, {"prompt": "a cup"})
        seen: list[str] = []
        done = bridge.wait_for_job(server, job.id, lambda j: seen.append(j.status), poll_s=0.05)
        assert done.status == "completed" and done.outputs[0].endswith(".jpg") and done.request["seed"] == 5
        assert server.store.get(job.id).dialect == bridge.JOB_KIND
        random = bridge.submit_generation(server, {**fields, "seed": None}, {}, {})
        assert isinstance(random.request["seed"], int)
        server.worker.cancel(random.id)
        with pytest.raises(bridge.UIError, match="num_frames"):
            bridge.submit_generation(server, {"mode": "text2video", "num_frames": 4}, {}, {})


def test_more_fields_cannot_read_server_files(engine, tmp_path):
    """The "More fields" box named any local file as a request's image or action file (the server read it, and its
    errors told whether it existed); it follows the routes' rules now: media come as uploads, action files typed as
    strings are fetched only from URLs, data URIs or the operator's allowed folder (none here)."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from cosmos3.ui import bridge

    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 48)).save(secret)
    (tmp_path / "stats.json").write_text('{"k": "SECRET"}')
    app = playground(engine, tmp_path)
    with TestClient(app):
        server = app.state.server
        fields = {"mode": "image2video", "prompt": "a", "num_steps": 1, "num_frames": 5, "resolution": "256"}
        for extra in ({"image": str(secret)}, {"vision_path": str(secret)}, {"name": "../x"}):
            with pytest.raises(bridge.UIError, match="cannot be set by a client"):
                bridge.submit_generation(server, fields, {}, {}, extra)
        policy = {"mode": "forward_dynamics", "prompt": "a", "num_steps": 1, "domain_name": "bridge_orig"}
        for extra in ({"action_stats": str(tmp_path / "stats.json")}, {"action_path": str(tmp_path / "stats.json")}):
            with pytest.raises(bridge.UIError, match="local") as err:
                bridge.submit_generation(server, policy, {"image": str(secret)}, {}, extra)
            assert "SECRET" not in str(err.value) and "'k'" not in str(err.value)
        job = bridge.submit_generation(server, fields, {"image": str(secret)}, {}, {"shift": 5.0})  # uploads work
        assert job.request["shift"] == 5.0
        server.worker.cancel(job.id)


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            yield page
        finally:
            browser.close()


def snapshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("COSMOS3_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    return path


def fill(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(str(value))
    field.press("Tab")


@needs_chromium
def test_playground_generate_actions_and_chat(base_url, page, tmp_path):
    try:
        run_playground(base_url, page, tmp_path)
    except Exception:
        snapshot(page, tmp_path, "ui-failure")
        raise


def run_playground(base_url, page, tmp_path):
    picture = tmp_path / "observation.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(picture)
    page.goto(f"{base_url}/ui/")
    page.locator("#gen-run").wait_for(timeout=60_000)

    # Generate: a text2video of 96x64, 5 frames, 2 steps -> a playable <video>, the seed and the resolved request.
    fill(page, "gen-prompt", "A robot arm picks up a cup.")
    for elem_id, value in (("gen-width", 96), ("gen-height", 64), ("gen-frames", 5), ("gen-steps", 2)):
        fill(page, elem_id, value)
    fill(page, "gen-seed", 7)
    page.locator("#gen-run").click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#gen-result-video video');"
        " return v && v.readyState >= 1 && v.duration > 0 && v.videoWidth === 96 }",
        timeout=RUN_S,
    )
    assert page.locator("#gen-seed-used input").input_value() == "7"
    assert '"num_frames": 5' in page.locator("#gen-request").inner_text().replace("\n", " ") or re.search(
        r"num_frames\W+5", page.locator("#gen-request").inner_text()
    )
    assert "completed" in page.locator("#gen-status").inner_text()
    assert page.locator("#gen-files a, #gen-files [download]").count() >= 1
    snapshot(page, tmp_path, "ui-generate")

    # Actions: a policy rollout from an uploaded picture, two chunks of 4 actions -> the rollout and the plot.
    page.get_by_role("tab", name="Actions").click()
    fill(page, "act-prompt", "push the block")
    page.locator("#act-image input[type=file]").set_input_files(str(picture))
    page.locator("#act-image img").wait_for(timeout=30_000)
    for elem_id, value in (("act-chunk", 4), ("act-chunks", 2), ("act-steps", 1), ("act-seed", 3)):
        fill(page, elem_id, value)
    page.locator("#act-run").click()
    page.wait_for_function(
        "() => { const i = document.querySelector('#act-plot img'); return i && i.complete && i.naturalWidth > 0 }",
        timeout=RUN_S,
    )
    page.wait_for_function(
        "() => { const v = document.querySelector('#act-result-video video'); return v && v.readyState >= 1 }",
        timeout=30_000,
    )
    assert "completed" in page.locator("#act-status").inner_text()
    snapshot(page, tmp_path, "ui-actions")

    # Reasoner: a question about an uploaded picture -> an answer streamed in pieces.
    page.get_by_role("tab", name="Reasoner chat").click()
    page.locator("#chat-sampling").get_by_text("Sampling", exact=True).click()
    fill(page, "chat-max-tokens", 12)
    fill(page, "chat-seed", 0)
    page.locator("#chat-input input[type=file]").set_input_files(str(picture))
    page.locator("#chat-input img").first.wait_for(timeout=30_000)
    textbox = page.locator("#chat-input textarea")
    textbox.fill("What is in the picture?")
    textbox.press("Enter")
    page.wait_for_function(
        "() => (document.querySelector('#chat-status') || {}).innerText?.includes('Streamed')", timeout=RUN_S
    )
    status = page.locator("#chat-status").inner_text()
    pieces = int(re.search(r"Streamed (\d+) pieces \((\d+) characters\)", status).group(1))
    assert pieces > 1, status
    assert page.locator("#chat-log img").count() >= 1  # the question's picture
    snapshot(page, tmp_path, "ui-reasoner")
