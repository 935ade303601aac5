"""Soak test: mixed traffic against a real `cosmos3 serve --model tiny`, with a `kill -9` and a restart halfway.

    .venv/bin/python scripts/soak.py [--requests 200] [--workers 8] [--seed 0]

Sends every route (images, sync and async videos, /predict, chat and streaming chat, job listing, content,
DELETE), some malformed on purpose (bad JSON, unknown fields, lone surrogates, undecodable uploads, private URLs,
oversized sizes) and some cancelled. After `--kill-at` requests the server is killed with SIGKILL and started again
on the same job store. At the end it waits for every accepted async job and prints:

- lost jobs: accepted (200 with an id) and neither deleted by us nor final afterwards (404 or still active);
- 5xx answers (a GET of a failed job answers with the job's own code, as vLLM-Omni does: counted apart);
- final job states, and answers per route and status.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

SMALL = {"size": "64x48", "num_frames": "9", "num_inference_steps": "2"}


def png(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Server:
    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.root, self.proc, self.log = root, None, open(root / "server.log", "ab")  # noqa: SIM115

    def start(self) -> float:
        cmd = [sys.executable, "-c", "from cosmos3.cli import main; raise SystemExit(main())", "serve"]
        cmd += ["--model", "tiny", "--port", str(self.port), "--max-queue", "64", "--max-batch", "4"]
        cmd += ["--jobs-db", str(self.root / "jobs.db"), "--outputs-dir", str(self.root / "outputs")]
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        while time.monotonic() - started < 180:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.root / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("the server did not start within 180 s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return time.monotonic() - started


class Soak:
    def __init__(self, server: Server, rng: random.Random):
        self.server, self.rng = server, rng
        self.lock = threading.Lock()
        self.answers: collections.Counter = collections.Counter()  # (route, status)
        self.server_errors: list[str] = []
        self.failed_job_gets = 0
        self.accepted: dict[str, str] = {}  # async job id -> how it was made
        self.deleted: set[str] = set()
        self.unreachable = 0  # requests that found no server (the kill and restart)
        self.transport_errors: list[str] = []  # requests that failed without a reply while the server was up
        self.up = threading.Event()
        self.up.set()
        self.running_at_kill: list[str] = []

    # ------------------------------------------------------------------------------------------- plumbing
    def call(self, route: str, method: str, path: str, **kwargs) -> httpx.Response | None:
        for _ in range(3):
            self.up.wait(300)
            try:
                r = httpx.request(method, f"{self.server.url}{path}", timeout=120, **kwargs)
            except httpx.TransportError as exc:
                if self.up.is_set():  # not the kill and restart: a real failure
                    with self.lock:
                        self.transport_errors.append(f"{method} {path}: {type(exc).__name__}")
                    return None
                with self.lock:
                    self.unreachable += 1
                continue  # the server was killed under this request: send it again once it is back
            with self.lock:
                self.answers[(route, r.status_code)] += 1
                if r.status_code >= 500:
                    is_job = r.headers.get("content-type", "").startswith("application/json") and "object" in r.json()
                    if method == "GET" and path.startswith("/v1/videos/") and is_job:
                        self.failed_job_gets += 1
                    else:
                        self.server_errors.append(f"{method} {path} {r.status_code} {r.text[:200]}")
            return r
        return None

    # ------------------------------------------------------------------------------------------- traffic
    def one(self, i: int) -> None:
        kind = self.rng.choices(
            ["video_async", "video_sync", "images", "predict", "chat", "chat_stream", "read", "cancel", "bad"],
            weights=[20, 10, 12, 10, 6, 4, 12, 8, 18],
        )[0]
        getattr(self, kind)(i)

    def video_async(self, i: int) -> None:
        files = {"input_reference": ("a.png", png(seed=i), "image/png")} if i % 3 == 0 else None
        r = self.call("POST /v1/videos", "POST", "/v1/videos", data={"prompt": f"soak {i}", **SMALL}, files=files)
        if r is not None and r.status_code == 200:
            with self.lock:
                self.accepted[r.json()["id"]] = "async"

    def video_sync(self, i: int) -> None:
        self.call("POST /v1/videos/sync", "POST", "/v1/videos/sync", data={"prompt": f"soak {i}", **SMALL})

    def images(self, i: int) -> None:
        body = {"prompt": f"soak {i}", "size": "64x48", "num_inference_steps": 2, "n": 1 + i % 2}
        self.call("POST /v1/images/generations", "POST", "/v1/images/generations", json=body)

    def predict(self, i: int) -> None:
        body = {"prompt": f"soak {i}", "num_steps": 2, "resolution": "256", "aspect_ratio": "4,3"}
        if i % 2:
            body |= {"model_mode": "text2image", "num_frames": 1}
        else:
            body |= {"model_mode": "image2video", "num_frames": 5}
            body["vision_path"] = "data:image/png;base64," + base64.b64encode(png(96, 64, i)).decode()
        self.call("POST /predict", "POST", "/predict", json=body)

    def chat(self, i: int, stream: bool = False) -> None:
        body = {"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 8, "stream": stream}
        self.call("POST /v1/chat/completions", "POST", "/v1/chat/completions", json=body)

    def chat_stream(self, i: int) -> None:
        self.chat(i, stream=True)

    def read(self, i: int) -> None:
        with self.lock:
            ids = list(self.accepted)
        choice = i % 4
        if choice == 0 or not ids:
            self.call("GET /v1/videos", "GET", "/v1/videos?limit=5")
        elif choice == 1:
            self.call("GET /v1/videos/{id}", "GET", f"/v1/videos/{self.rng.choice(ids)}")
        elif choice == 2:
            self.call("GET /v1/videos/{id}/content", "GET", f"/v1/videos/{self.rng.choice(ids)}/content")
        else:
            self.call("GET /health", "GET", "/health")
            self.call("GET /v1/models", "GET", "/v1/models")

    def cancel(self, i: int) -> None:
        r = self.call("POST /v1/videos", "POST", "/v1/videos", data={"prompt": f"cancel {i}", **SMALL})
        if r is None or r.status_code != 200:
            return
        job_id = r.json()["id"]
        with self.lock:
            self.accepted[job_id] = "cancelled"
        for _ in range(50):  # a running job answers 409 until it has stopped
            d = self.call("DELETE /v1/videos/{id}", "DELETE", f"/v1/videos/{job_id}")
            if d is not None and d.status_code == 200:
                with self.lock:
                    self.deleted.add(job_id)
                return
            if d is not None and d.status_code == 404:  # an earlier DELETE landed, then the server was killed
                with self.lock:
                    self.deleted.add(job_id)
                return
            time.sleep(0.1)

    def bad(self, i: int) -> None:
        cases = [
            ("POST /v1/images/generations", "POST", "/v1/images/generations", {"content": b"{not json"}),
            ("POST /v1/images/generations", "POST", "/v1/images/generations", {"json": {"prompt": "a", "stray": 1}}),
            (
                "POST /v1/images/generations",
                "POST",
                "/v1/images/generations",
                {"content": b'{"prompt": "\\ud800x"}', "headers": {"Content-Type": "application/json"}},
            ),
            ("POST /v1/videos/sync", "POST", "/v1/videos/sync", {"data": {"prompt": "a", "size": "9999x9999"}}),
            (
                "POST /v1/videos",
                "POST",
                "/v1/videos",
                {
                    "data": {"prompt": "a", **SMALL},
                    "files": {"input_reference": ("x.png", os.urandom(500), "image/png")},
                },
            ),
            ("POST /predict", "POST", "/predict", {"json": {"model_mode": "image2video", "vision_path": "data:,!!"}}),
            (
                "POST /predict",
                "POST",
                "/predict",
                {"json": {"model_mode": "image2video", "vision_path": "http://169.254.169.254/latest/meta-data"}},
            ),
            (
                "POST /v1/chat/completions",
                "POST",
                "/v1/chat/completions",
                {"json": {"messages": [{"role": "user", "content": "hi"}], "media_io_kwargs": {"video": "x"}}},
            ),
            ("POST /v1/videos", "POST", "/v1/videos", {"data": {"prompt": "a", "extra_params": '{"video": "/etc"}'}}),
            ("DELETE /v1/videos/{id}", "DELETE", "/v1/videos/video_gen_nope", {}),
        ]
        route, method, path, kwargs = cases[i % len(cases)]
        r = self.call(route, method, path, **kwargs)
        if r is not None and not 400 <= r.status_code < 500:
            with self.lock:
                self.server_errors.append(f"malformed {method} {path} answered {r.status_code}: {r.text[:200]}")

    def wait_for_a_running_job(self, timeout: float = 30) -> None:
        """Until one of the async jobs (not one we cancel) runs, so that the kill interrupts it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                jobs = httpx.get(f"{self.server.url}/v1/videos?limit=100", timeout=10).json()["data"]
            except httpx.TransportError:
                return
            with self.lock:
                running = [
                    j["id"] for j in jobs if j["status"] == "in_progress" and self.accepted.get(j["id"]) == "async"
                ]
            if running:
                self.running_at_kill = running
                return
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------------- the end
    def settle(self, timeout: float = 600) -> dict[str, tuple[str, str]]:
        """Every accepted job's final (status, error message): "lost" for a 404 we did not cause by a DELETE,
        "active" for a job that never ends."""
        deadline = time.monotonic() + timeout
        final: dict[str, tuple[str, str]] = {}
        pending = set(self.accepted) - self.deleted
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                r = httpx.get(f"{self.server.url}/v1/videos/{job_id}", timeout=30)
                body = r.json()
                status = "lost" if r.status_code == 404 else body["status"]
                if status not in ("queued", "in_progress", "cancelling"):
                    final[job_id] = (
                        status,
                        ((body.get("error") or {}).get("message") or "") if status != "lost" else "",
                    )
                    pending.discard(job_id)
            time.sleep(0.5)
        final.update({job_id: ("active (never finished)", "") for job_id in pending})
        return final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kill-at", type=int, default=None, help="kill -9 after this many requests (default: half)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kill_at = args.kill_at if args.kill_at is not None else args.requests // 2

    root = Path(tempfile.mkdtemp(prefix="cosmos3-soak-"))
    server = Server(root)
    print(f"server: {server.url}, files under {root}", flush=True)
    print(f"started in {server.start():.1f} s", flush=True)
    soak = Soak(server, random.Random(args.seed))
    started = time.monotonic()
    with ThreadPoolExecutor(args.workers) as pool:
        futures = []
        for i in range(args.requests):
            if i == kill_at:
                soak.wait_for_a_running_job()  # so that the kill interrupts one
                soak.up.clear()
                server.kill()
                print(f"kill -9 after {i} requests were sent; restarting", flush=True)
                print(f"restarted in {server.start():.1f} s", flush=True)
                soak.up.set()
            futures.append(pool.submit(soak.one, i))
        for f in futures:
            f.result()
    final = soak.settle()
    elapsed = time.monotonic() - started

    states = collections.Counter(status for status, _ in final.values())
    lost = sorted(j for j, (s, _) in final.items() if s in ("lost", "active (never finished)"))
    print(f"\n{args.requests} requests in {elapsed:.0f} s (one kill -9 and restart after request {kill_at})")
    print(f"answers: {sum(soak.answers.values())}; sent again after the kill: {soak.unreachable}")
    for (route, status), n in sorted(soak.answers.items()):
        print(f"  {route:32s} {status}: {n}")
    print(f"transport errors while the server was up: {len(soak.transport_errors)} {soak.transport_errors[:5]}")
    failed_gets = soak.failed_job_gets
    print(
        f"5xx answers: {len(soak.server_errors)} (besides {failed_gets} GETs of failed jobs, answered with the "
        "job's own code as vLLM-Omni does)"
    )
    for line in soak.server_errors[:20]:
        print(f"  {line}")
    print(f"accepted async jobs: {len(soak.accepted)}, deleted by the soak: {len(soak.deleted)}")
    print(f"final states: {dict(states)}")
    reasons = collections.Counter(message for status, message in final.values() if status == "failed")
    for message, n in reasons.most_common():
        print(f"  failed x{n}: {message}")
    at_kill = {j: "deleted by the soak" if j in soak.deleted else final.get(j, "?") for j in soak.running_at_kill}
    print(f"async jobs running at the kill, and what became of them: {at_kill}")
    print(f"lost jobs: {len(lost)} {lost[:10]}")
    stop_s = server.stop()
    print(f"SIGTERM stop took {stop_s:.1f} s")
    return 1 if lost or soak.server_errors or soak.transport_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
