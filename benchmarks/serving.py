"""HTTP load generator against `cosmos3 serve`, in the manner of vLLM's benchmarks/benchmark_serving.py.

It writes a random-weight checkpoint of the preset's size (`checkpoint.py`; Nano: ~30 GB of bf16, made on the GPU),
starts `cosmos3 serve` on it as a subprocess (or talks to `--base-url`), and measures:

1. Streamed chat completions at each `--concurrency` (a closed loop of that many clients): every request is a
   ~50-token text prompt plus a short MP4 it makes itself (8 frames of 448x448: 784 vision tokens), sent as a
   `video_url` data URI (or a local path, `--media path`), `stream: true`, `stream_options.include_usage`, a fixed
   `max_tokens`, temperature 0.7 with a per-request seed. Per request: TTFT (first content chunk), inter-token
   latency (gaps between content chunks; tokens counted from the final usage chunk), end-to-end latency. Per level:
   median / p90 TTFT, median ITL, mean TPOT, output tokens/s and requests/s over the level's wall time. cosmos3 has
   no ignore_eos: with random weights a reply may stop early, so the actual output tokens are reported.
2. Chat TTFT while a video job runs: an async text2video job (`POST /v1/videos`), and chats sent one after another
   while its status is `in_progress`, each with its TTFT and whether the job was still running when it finished;
   the job's total time against the same job alone (after a 1-step warm-up job of that shape, which pays for
   torch.compile's first pass).

    python benchmarks/serving.py --out serving.json            # GPU: Nano-size checkpoint, 1 / 16 / 64 clients
    python benchmarks/serving.py --preset tiny                 # CPU smoke test (about a minute)
    python benchmarks/serving.py --base-url http://host:8000   # an already running server (nothing started)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()
FINAL = ("completed", "failed", "cancelled")

# Per preset: what the benchmark sends. Nano's video job is 720p with few steps (long enough to send chats during
# it, short enough for the whole run to take ~5 minutes on an H200); tiny's sizes keep the CPU smoke test short.
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(
        concurrency=[1, 16, 64],
        max_tokens=128,
        video_job_size="1280x720",
        video_job_frames=93,
        video_job_steps=4,
        device=None,
        startup_timeout=900.0,
    ),
    "tiny": dict(
        concurrency=[1, 4],
        max_tokens=32,
        video_job_size="640x384",
        video_job_frames=33,
        video_job_steps=12,
        device="cpu",
        startup_timeout=180.0,
    ),
}
PROMPT = (
    "A robot arm in a kitchen reaches for the red cup on the table, lifts it and carries it to the sink. "
    "Describe what happens in the video, step by step, and say what the robot will most likely do next. "
)


# ------------------------------------------------------------------------------------------------ inputs
def make_clip(frames: int, size: int, fps: float) -> bytes:
    """A small H.264 MP4: a gradient with a moving square (smooth content keeps the data URI to a few tens of KB,
    as a real clip would be; noise would not compress)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=int(fps) if float(fps).is_integer() else fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        y, x = np.mgrid[0:size, 0:size]
        for i in range(frames):
            img = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 40 + 20 * i)], -1).astype(np.uint8)
            at = (i * size // (2 * frames)) + size // 8
            img[at : at + size // 4, at : at + size // 4] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def prompt_text(i: int, chars: int) -> str:
    """A prompt of `chars` ASCII characters (= tokens with the benchmark checkpoint's byte-level tokenizer), distinct
    per request."""
    text = f"Request {i}. " + PROMPT * (chars // len(PROMPT) + 1)
    return text[:chars]


def chat_body(args: argparse.Namespace, video_url: str, i: int, max_tokens: int | None = None) -> dict[str, Any]:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video_url}},
                    {"type": "text", "text": prompt_text(i, args.prompt_chars)},
                ],
            }
        ],
        "max_tokens": max_tokens or args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed + i,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every frame of the clip, whatever the processor's default sampling fps.
        "mm_processor_kwargs": {"num_frames": args.clip_frames},
    }


# ------------------------------------------------------------------------------------------------ one chat
@dataclass
class Chat:
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter at the first attempt
    end: float = 0.0
    ttft: float | None = None  # seconds to the first non-empty content chunk (429 retries included)
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    rejected: int = 0  # 429 answers before it was admitted

    @property
    def e2e(self) -> float:
        return self.end - self.start


async def stream_chat(client: httpx.AsyncClient, body: dict, backoff: float, max_wait: float = 600.0) -> Chat:
    """One streamed chat completion. A 429 (the server's cap on running conversations) is retried after `backoff`
    seconds, as a client would; its wait counts in TTFT and end-to-end latency."""
    out = Chat(start=time.perf_counter())
    while True:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 429 and time.perf_counter() - out.start < max_wait:
                    await r.aread()
                    out.rejected += 1
                    await asyncio.sleep(backoff)
                    continue
                if r.status_code != 200:
                    out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                    break
                last = None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        out.ok = out.error is None
                        break
                    event = json.loads(data)
                    if "error" in event:
                        out.error = f"stream error: {event['error'].get('message')}"
                        continue
                    now = time.perf_counter()
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            if out.ttft is None:
                                out.ttft = now - out.start
                            else:
                                out.gaps.append(now - last)
                            last = now
                            out.chunks += 1
                        if choice.get("finish_reason"):
                            out.finish_reason = choice["finish_reason"]
                    usage = event.get("usage")
                    if usage:
                        out.prompt_tokens = usage.get("prompt_tokens")
                        out.completion_tokens = usage.get("completion_tokens")
                if not out.ok and out.error is None:
                    out.error = "the stream ended without [DONE]"
                break
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            break
    out.end = time.perf_counter()
    return out


def say(message: str) -> None:
    """A progress line with the seconds since start, so that a cut-off run still shows where its time went."""
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def save(report: dict[str, Any], path: str | None) -> None:
    """The JSON so far (after every phase: a run stopped by a time limit keeps what it measured)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


# ------------------------------------------------------------------------------------------------ statistics
def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize(chats: list[Chat], seconds: float, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """vLLM's per-run metrics: TTFT and ITL percentiles over requests (ITL gaps pooled over all requests), TPOT =
    (e2e - TTFT) / (tokens - 1) per request, throughputs over the level's wall time."""
    done = [c for c in chats if c.ok]
    ttft = [c.ttft for c in done if c.ttft is not None]
    gaps = [g for c in done for g in c.gaps]
    tokens = [c.completion_tokens or 0 for c in done]
    tpot = [(c.e2e - c.ttft) / (c.completion_tokens - 1) for c in done if c.ttft and (c.completion_tokens or 0) > 1]
    errors = sorted({c.error for c in chats if c.error})
    return {
        "concurrency": concurrency,
        "requests": len(chats),
        "completed": len(done),
        "failed": len(chats) - len(done),
        "errors": errors[:5],
        "rejected_429": sum(c.rejected for c in chats),
        "requests_rejected_at_least_once": sum(1 for c in chats if c.rejected),
        "duration_s": round(seconds, 2),
        "request_throughput": round(len(done) / seconds, 3) if seconds else None,
        "output_tok_s": round(sum(tokens) / seconds, 1) if seconds else None,
        "prompt_tokens": int(np.median([c.prompt_tokens for c in done if c.prompt_tokens])) if done else None,
        "output_tokens_mean": round(float(np.mean(tokens)), 1) if tokens else None,
        "output_tokens_min": min(tokens) if tokens else None,
        "stopped_early": sum(1 for t in tokens if t < max_tokens),
        "chunks_per_token": round(sum(c.chunks for c in done) / max(1, sum(tokens)), 3),
        "ttft_median_ms": ms(pct(ttft, 50)),
        "ttft_p90_ms": ms(pct(ttft, 90)),
        "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_median_ms": ms(pct(gaps, 50)),
        "itl_p90_ms": ms(pct(gaps, 90)),
        "tpot_mean_ms": ms(float(np.mean(tpot)) if tpot else None),
        "e2e_median_ms": ms(pct([c.e2e for c in done], 50)),
    }


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |")
    for row in rows:
        print("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    print(flush=True)


# ------------------------------------------------------------------------------------------------ scenarios
async def run_level(
    client: httpx.AsyncClient, args: argparse.Namespace, video_url: str, concurrency: int, n: int, offset: int
) -> dict[str, Any]:
    """`n` requests through `concurrency` clients, each sending its next request when its last one ends. After
    `--level-timeout` seconds no new request is sent (those in flight finish), so that a slow server cannot make
    a one-shot run overrun its time."""
    todo = iter(range(n))
    start = time.perf_counter()

    async def client_loop() -> list[Chat]:
        done = []
        for i in todo:  # a shared iterator: the clients take turns drawing requests
            if time.perf_counter() - start > args.level_timeout:
                break
            done.append(await stream_chat(client, chat_body(args, video_url, offset + i), args.backoff))
        return done

    per_client = await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    chats = [c for group in per_client for c in group]
    summary = summarize(chats, seconds, concurrency, args.max_tokens)
    summary["cut_by_level_timeout"] = len(chats) < n
    return summary


def video_form(args: argparse.Namespace, steps: int, seed: int) -> dict[str, str]:
    return {
        "prompt": "A robot arm picks up a red cup from a kitchen table and puts it in the sink.",
        "size": args.video_job_size,
        "num_frames": str(args.video_job_frames),
        "num_inference_steps": str(steps),
        "seed": str(seed),
    }


async def job_status(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/videos/{job_id}")
    r.raise_for_status()
    return r.json()


class VideoJob:
    """An async video job and a poller that notes when it was seen running and finished."""

    def __init__(self, client: httpx.AsyncClient, form: dict[str, str], poll: float):
        self.client, self.form, self.poll = client, form, poll
        self.id: str | None = None
        self.status = "unsent"
        self.submitted = self.started = self.finished = None
        self.info: dict[str, Any] = {}
        self.task: asyncio.Task | None = None

    async def submit(self) -> None:
        self.submitted = time.perf_counter()
        r = await self.client.post("/v1/videos", data=self.form)
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/videos: HTTP {r.status_code}: {r.text[:300]}")
        self.info = r.json()
        self.id, self.status = self.info["id"], self.info["status"]
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while self.status not in FINAL:
            await asyncio.sleep(self.poll)
            self.info = await job_status(self.client, self.id)
            self.status = self.info["status"]
            if self.status in ("in_progress", "cancelling") and self.started is None:
                self.started = time.perf_counter()
        self.finished = time.perf_counter()

    async def wait(self) -> dict[str, Any]:
        await self.task
        return self.result()

    def result(self) -> dict[str, Any]:
        end = self.finished
        return {
            "id": self.id,
            "status": self.status,
            "error": self.info.get("error"),
            "total_s": round(end - self.submitted, 2) if end else None,
            "queued_s": round(self.started - self.submitted, 2) if self.started else None,
            "running_s": round(end - self.started, 2) if end and self.started else None,
        }


async def video_alone(client: httpx.AsyncClient, args: argparse.Namespace, steps: int, seed: int) -> dict[str, Any]:
    job = VideoJob(client, video_form(args, steps, seed), args.poll)
    await job.submit()
    return await job.wait()


async def video_with_chats(client: httpx.AsyncClient, args: argparse.Namespace, video_url: str) -> dict[str, Any]:
    """Chats one after another while the job is in progress (at most `--video-chats`)."""
    job = VideoJob(client, video_form(args, args.video_job_steps, args.seed + 1), args.poll)
    await job.submit()
    while job.status in ("unsent", "queued"):
        await asyncio.sleep(args.poll / 4)
    chats = []
    i = 0
    while job.status == "in_progress" and len(chats) < args.video_chats:
        sent = time.perf_counter() - job.submitted
        chat = await stream_chat(client, chat_body(args, video_url, 100_000 + i), args.backoff)
        running = (await job_status(client, job.id))["status"] == "in_progress"
        chats.append(
            {
                "sent_at_s": round(sent, 2),
                "ttft_ms": ms(chat.ttft),
                "e2e_ms": ms(chat.e2e),
                "output_tokens": chat.completion_tokens,
                "job_running_at_end": running,
                "error": chat.error,
            }
        )
        i += 1
    result = await job.wait()
    ttfts = [c["ttft_ms"] for c in chats if c["ttft_ms"] is not None]
    return {
        "job": result,
        "chats": chats,
        "chat_ttft_median_ms": round(float(np.median(ttfts)), 1) if ttfts else None,
        "chats_finished_while_running": sum(1 for c in chats if c["job_running_at_end"]),
    }


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cosmos3_command() -> list[str]:
    exe = Path(sys.executable).with_name("cosmos3")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "cosmos3.cli"]


def start_server(model: Path, port: int, work: Path, args: argparse.Namespace, media_dir: Path | None):
    command = cosmos3_command() + [
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-guardrails",
        "--jobs-db",
        str(work / "jobs.db"),
        "--outputs-dir",
        str(work / "outputs"),
        "--max-queue",
        "64",
    ]
    if args.device:
        command += ["--device", args.device]
    if media_dir is not None:
        command += ["--allowed-local-media-path", str(media_dir)]
    command += shlex.split(args.serve_args)
    log = open(work / "server.log", "w")  # noqa: SIM115 (kept open for the server's lifetime)
    # A session of its own: a Ctrl-C in this terminal reaches this script only, which stops the server in order.
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, command, log


def wait_healthy(base_url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{tail(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_problems(path: Path, most: int = 20) -> list[str]:
    """Server log lines that say something went wrong (tracebacks, errors, 5xx answers)."""
    if not path.is_file():
        return []
    marks = ("Traceback", "ERROR", "Error:", "Exception", '" 500 ', '" 502 ', '" 503 ', '" 504 ')
    lines = [line for line in path.read_text(errors="replace").splitlines() if any(m in line for m in marks)]
    return lines[:most] + ([f"... {len(lines) - most} more"] if len(lines) > most else [])


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------ the run
def gpu_info() -> dict[str, Any]:
    """GPU name and memory from nvidia-smi (no CUDA context in this process for it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        name, used, total = (v.strip() for v in out.splitlines()[0].split(","))
        return {"gpu": name, "memory_used_mib": int(used), "memory_total_mib": int(total)}
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return {"gpu": "cpu"}


def checkpoint_folder(args: argparse.Namespace) -> tuple[Path, bool]:
    """--checkpoint, else a fresh folder in /dev/shm when it has room (the loader then reads from memory, and
    writing 30 GB takes seconds, not a disk's minutes), else in the temp folder. Returns (folder, remove at end)."""
    if args.checkpoint:
        return Path(args.checkpoint), False
    need = (32 if args.preset == "nano" else 1) * 2**30
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and shutil.disk_usage(shm).free > need + 8 * 2**30 else None
    return Path(tempfile.mkdtemp(prefix=f"cosmos3-serving-{args.preset}-", dir=where)), not args.keep_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="nano", help="model size and request sizes")
    p.add_argument("--base-url", help="an already running server (no checkpoint is written, no server started)")
    p.add_argument("--checkpoint", help="folder for the random checkpoint (reused when it holds a finished one)")
    p.add_argument("--keep-checkpoint", action="store_true", help="do not remove the checkpoint written here")
    p.add_argument("--concurrency", type=int, nargs="+", help="clients per level (nano: 1 16 64; tiny: 1 4)")
    p.add_argument("--requests", type=int, nargs="+", help="requests per level (default: max(8, 2 x clients))")
    p.add_argument("--max-tokens", type=int, help="reply tokens asked for (nano: 128; tiny: 32)")
    p.add_argument("--prompt-chars", type=int, default=50, help="text prompt length (= tokens, byte tokenizer)")
    p.add_argument("--clip-frames", type=int, default=8)
    p.add_argument("--clip-size", type=int, default=448, help="clip width = height")
    p.add_argument("--clip-fps", type=float, default=2.0)
    p.add_argument("--media", choices=("data", "path"), default="data", help="clip as a data URI or a local path")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    p.add_argument("--backoff", type=float, default=0.25, help="seconds before a 429'd chat is sent again")
    p.add_argument("--level-timeout", type=float, default=120.0, help="seconds after which a level sends no more")
    p.add_argument("--video-job-size", help="WxH of the video job (nano: 1280x720)")
    p.add_argument("--video-job-frames", type=int, help="frames of the video job (nano: 93)")
    p.add_argument("--video-job-steps", type=int, help="denoising steps of the video job (nano: 4)")
    p.add_argument("--video-chats", type=int, default=20, help="the most chats sent during the video job")
    p.add_argument("--skip-video", action="store_true", help="only the chat concurrency levels")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between video job status polls")
    p.add_argument("--device", help="the server's --device (tiny: cpu)")
    p.add_argument("--serve-args", default="", help="more `cosmos3 serve` flags, e.g. '--compile off'")
    p.add_argument("--startup-timeout", type=float, help="seconds for the server to answer /health")
    p.add_argument("--out", help="write every number as JSON here")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.requests is None:
        args.requests = [max(8, 2 * c) for c in args.concurrency]
    if len(args.requests) != len(args.concurrency):
        p.error("--requests needs one count per --concurrency level")
    return args


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


async def benchmark(args: argparse.Namespace, base_url: str, video_url: str, report: dict[str, Any]) -> None:
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8, max_keepalive_connections=max(args.concurrency))
    timeout = httpx.Timeout(900.0, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        # Warm-up: one chat, then a full batch of short ones (CUDA graphs, allocator, the processor's first call).
        start = time.perf_counter()
        first = await stream_chat(client, chat_body(args, video_url, 200_000, max_tokens=8), args.backoff)
        if not first.ok:
            raise RuntimeError(f"the warm-up chat failed: {first.error}")
        burst = min(16, max(args.concurrency))
        await asyncio.gather(
            *(stream_chat(client, chat_body(args, video_url, 200_001 + i, 8), args.backoff) for i in range(burst))
        )
        report["chat_warmup_s"] = round(time.perf_counter() - start, 2)
        say(f"warm-up chats: {report['chat_warmup_s']} s (first TTFT {ms(first.ttft)} ms)")

        levels = report["levels"] = []
        offset = 0
        for concurrency, n in zip(args.concurrency, args.requests, strict=True):
            levels.append(await run_level(client, args, video_url, concurrency, n, offset))
            offset += n
            say(json.dumps(levels[-1]))
            save(report, args.out)
        print("\n### Streamed chat completions\n")
        print_table(
            [
                "clients",
                "requests",
                "ok",
                "429s",
                "prompt tok",
                "out tok (mean / min)",
                "stopped early",
                "TTFT median ms",
                "TTFT p90 ms",
                "ITL median ms",
                "TPOT mean ms",
                "e2e median ms",
                "out tok/s",
                "req/s",
            ],
            [
                [
                    lv["concurrency"],
                    lv["requests"],
                    lv["completed"],
                    lv["rejected_429"],
                    lv["prompt_tokens"],
                    f"{lv['output_tokens_mean']} / {lv['output_tokens_min']}",
                    lv["stopped_early"],
                    lv["ttft_median_ms"],
                    lv["ttft_p90_ms"],
                    lv["itl_median_ms"],
                    lv["tpot_mean_ms"],
                    lv["e2e_median_ms"],
                    lv["output_tok_s"],
                    lv["request_throughput"],
                ]
                for lv in levels
            ],
        )
        if args.skip_video:
            return
        video = report["video"] = {}
        video["warmup_1_step"] = await video_alone(client, args, 1, args.seed + 2)
        say(f"video warm-up job (1 step, compiles the shape): {json.dumps(video['warmup_1_step'])}")
        save(report, args.out)
        video["alone"] = await video_alone(client, args, args.video_job_steps, args.seed + 1)
        say(f"video job alone: {json.dumps(video['alone'])}")
        save(report, args.out)
        video["with_chats"] = await video_with_chats(client, args, video_url)
        with_chats = video["with_chats"]
        say(f"video job with chats: {json.dumps(with_chats['job'])}")
        save(report, args.out)
        print(
            f"\n### Chat TTFT while a video job runs ({args.video_job_size}, {args.video_job_frames} frames, "
            f"{args.video_job_steps} steps)\n"
        )
        print(
            f"video job alone: {video['alone']['total_s']} s; with chats: {with_chats['job']['total_s']} s; "
            f"idle chat TTFT (1 client, median): {levels[0]['ttft_median_ms']} ms\n"
        )
        print_table(
            ["chat", "sent at s (after job submit)", "TTFT ms", "e2e ms", "out tok", "job still running at its end"],
            [
                [i, c["sent_at_s"], c["ttft_ms"], c["e2e_ms"], c["output_tokens"], c["job_running_at_end"]]
                for i, c in enumerate(with_chats["chats"])
            ],
        )


def notes(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Plain-language flags on what the numbers mean (early stops, 429s, chats that waited for the video)."""
    out = []
    for lv in report.get("levels", []):
        if lv["stopped_early"]:
            out.append(
                f"{lv['concurrency']} clients: {lv['stopped_early']} of {lv['completed']} replies stopped before "
                f"max_tokens={args.max_tokens} (EOS sampled; cosmos3 has no ignore_eos); tok/s counts actual tokens"
            )
        if lv["rejected_429"]:
            out.append(
                f"{lv['concurrency']} clients: {lv['rejected_429']} answers were 429 "
                f"({lv['requests_rejected_at_least_once']} requests waited for admission, retried every "
                f"{args.backoff} s; TTFT includes that wait)"
            )
        if lv.get("cut_by_level_timeout"):
            out.append(
                f"{lv['concurrency']} clients: only {lv['requests']} requests were sent within --level-timeout "
                f"{args.level_timeout} s"
            )
        if lv["failed"]:
            out.append(f"{lv['concurrency']} clients: {lv['failed']} requests failed: {lv['errors']}")
        if lv["chunks_per_token"] < 0.95:
            out.append(
                f"{lv['concurrency']} clients: {lv['chunks_per_token']} content chunks per token (some tokens decode "
                "to partial characters and are sent with the next): ITL is per chunk, TPOT per token"
            )
    with_chats = report.get("video", {}).get("with_chats")
    if with_chats:
        chats = with_chats["chats"]
        if not chats:
            out.append("the video job finished before a chat could be sent: make it longer (--video-job-steps)")
        elif not with_chats["chats_finished_while_running"]:
            out.append(
                f"no chat finished while the video job was running ({len(chats)} sent): chats waited for the job"
            )
        levels = report.get("levels") or [{}]
        idle, first = levels[0].get("ttft_median_ms"), chats[0]["ttft_ms"] if chats else None
        job_s = with_chats["job"]["total_s"]
        if idle and first and first > max(1000.0, 10 * idle) and job_s:
            out.append(
                f"the first chat during the video job (sent {chats[0]['sent_at_s']} s after submit) waited "
                f"{first / 1000:.1f} s for its first token (idle: {idle} ms; the job took {job_s} s): it did not "
                "interleave with the job's engine work; later chats ran while the job was still in_progress after it"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import cosmos3

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **gpu_info(),
        "torch": torch.__version__,
        "cosmos3": getattr(cosmos3, "__version__", None),
        "git_commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    print(f"# cosmos3 serving benchmark, {report['date']}")
    print(f"{report['gpu']}, torch {report['torch']}, cosmos3 {report['cosmos3']} ({report['git_commit']})")
    print("config: " + json.dumps(report["config"]), flush=True)

    work = Path(tempfile.mkdtemp(prefix="cosmos3-serving-"))
    clip = make_clip(args.clip_frames, args.clip_size, args.clip_fps)
    media_dir = None
    if args.media == "path":
        media_dir = work / "media"
        media_dir.mkdir()
        (media_dir / "clip.mp4").write_bytes(clip)
        video_url = str(media_dir / "clip.mp4")
    else:
        video_url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    report["clip"] = {
        "frames": args.clip_frames,
        "size": f"{args.clip_size}x{args.clip_size}",
        "fps": args.clip_fps,
        "mp4_bytes": len(clip),
        "sent_as": args.media,
    }
    say(f"clip: {json.dumps(report['clip'])}")

    proc = log = None
    folder, remove = None, False
    code = 0
    try:
        if args.base_url:
            base_url = args.base_url.rstrip("/")
            report["server"] = {"base_url": base_url, "started_here": False}
            wait_healthy(base_url, None, args.startup_timeout, None)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from checkpoint import write_serving_checkpoint

            folder, remove = checkpoint_folder(args)
            report["checkpoint"] = {"folder": str(folder), **write_serving_checkpoint(folder, args.preset, seed=0)}
            say(f"checkpoint: {json.dumps(report['checkpoint'])}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            proc, command, log = start_server(folder, port, work, args, media_dir)
            startup = wait_healthy(base_url, proc, args.startup_timeout, work / "server.log")
            report["server"] = {
                "command": shlex.join(command),
                "started_here": True,
                "startup_s": round(startup, 1),
                **{f"after_load_{k}": v for k, v in gpu_info().items() if k != "gpu"},
            }
            say(f"server: {json.dumps(report['server'])}")
            save(report, args.out)
        asyncio.run(benchmark(args, base_url, video_url, report))
    except Exception as exc:  # report what was measured so far, and why it stopped
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"\nstopped: {report['error']}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if proc is not None:
            report["server"]["end_" + "memory_used_mib"] = gpu_info().get("memory_used_mib")
            stop_server(proc)
            log.close()
            report["server"]["log_tail"] = tail(work / "server.log", 15)
            report["server"]["log_problems"] = log_problems(work / "server.log")
        if remove and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    report["notes"] = notes(report, args)
    problems = report.get("server", {}).get("log_problems")
    if problems:
        report["notes"].append(f"the server log has {len(problems)} error lines; first: {problems[0][:200]}")
    if report["notes"]:
        print("notes:\n" + "\n".join(f"- {n}" for n in report["notes"]))
    if args.out:
        save(report, args.out)
        print(f"wrote {args.out}")
    if code:
        print(f"server log (last lines):\n{tail(work / 'server.log')}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
