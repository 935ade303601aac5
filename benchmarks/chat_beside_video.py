"""Chats beside a video on one GPU: a chat's time to first token while a text2video job generates, through the
server's own path (the job `Worker` and the chat route's `Conversations`, which lend the engine between layers:
`cosmos3.turns`), against the same chat with the GPU idle; and the video's time with the chats beside it against
the same video alone, with both videos' bytes compared.

Nano transformer (random bf16 weights), a full-size Wan2.2 VAE, a tokenizer that decodes every id (one streamed
piece per token); 720p text2video, 189 frames, 3 steps, guidance 6; 5 streamed chats of 32 tokens, one every 2 s
from 1 s into the job. A warm-up video (1 step) and chat come first.

    python benchmarks/chat_beside_video.py --json chat_beside_video.json
    python benchmarks/chat_beside_video.py --preset tiny --size tiny-smoke --steps 40 --first-chat 0.05 \
        --interval 0.05 --chat-tokens 8                                      # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from checkpoint import serving_config
from common import SCHEDULE, SIZES, default_device, gpu_name, print_table, random_model, save_rows, wan22_vae

import cosmos3
from cosmos3.engine import Engine, speed_up_generation
from cosmos3.generation.codecs import VideoCodec
from cosmos3.generation.pipeline import Generator
from cosmos3.generation.sampler import Schedule
from cosmos3.loading.tiny import build_tokenizer, write_pipeline
from cosmos3.reasoning.decoding import Sampling
from cosmos3.reasoning.reasoner import Reasoner
from cosmos3.server.chat import Conversations
from cosmos3.server.jobs import JobStore, Worker

PROMPT = "A robot arm picks up a red cup from a wooden table in a bright lab, then sets it down next to a blue bowl."


def build_engine(name: str, device: torch.device, folder: Path, compile: bool) -> Engine:
    """An Engine loaded from a tiny pipeline folder (cheap to write), then given a random model of preset `name`, a
    Wan2.2 VAE of matching size and a full-vocabulary tokenizer: the objects the server runs, without writing
    ~30 GB of Nano weights to disk."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = cosmos3.load(
        write_pipeline(folder / "pipeline", cfg=serving_config("tiny"), with_vision=False),
        device=device,
        dtype=dtype,
        compile=False,
        guardrails=False,
    )
    cfg, model = random_model(serving_config(name), device, dtype=dtype)
    if compile:  # as the server's defaults (compile="auto", flash_attention="auto") do on one GPU
        speed_up_generation(model, device, compile="auto", one_gpu=device.type == "cuda")
    tokenizer = build_tokenizer(cfg.vocab_size)  # every id a random model samples decodes to text
    video = VideoCodec(wan22_vae(device, cfg.latent_channel, full=name != "tiny"), cfg.latent_channel)
    parts = replace(engine.generator.parts, transformer=model, video=video, tokenizer=tokenizer)
    parts.schedule = Schedule(SCHEDULE)
    engine.transformer, engine.generator = model, Generator(parts)
    engine.reasoner = Reasoner(model, tokenizer)
    engine.reasoner.eos_token_ids = []  # every chat decodes its whole budget
    engine.defaults = {}
    return engine


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what will the robot do after it sets the cup down? {PROMPT}"}]


async def chat(conversations: Conversations, reasoner: Reasoner, i: int, tokens: int) -> dict:
    """One streamed chat through the chat route's path; seconds to its first piece and to its end, and its text."""
    sampling = Sampling(max_tokens=tokens, temperature=0.0, presence_penalty=0.0, seed=i)
    start = time.perf_counter()
    first, pieces, stop = await conversations.stream(reasoner, messages(i), sampling, {})
    ttft = time.perf_counter() - start
    text, (kind, value) = [], first
    try:
        while kind == "delta":
            text.append(value.text)
            kind, value = await pieces.get()
    finally:
        stop.set()
    if kind == "error":
        raise value
    return {"ttft_s": ttft, "total_s": time.perf_counter() - start, "text": "".join(text)}


def video_request(engine: Engine, size: str, steps: int) -> dict:
    frames, height, width = SIZES[size]
    fields = dict(num_frames=frames, height=height, width=width, num_steps=steps, guidance=6.0, seed=0)
    return engine.request(mode="text2video", prompt=PROMPT, **fields).__dict__


async def video(worker: Worker, request: dict) -> tuple[str, float]:
    """Queue a job and wait for it to start; returns its id and when it was queued."""
    job = worker.submit("python", request, {})
    submitted = time.perf_counter()
    while worker.store.get(job.id).status == "queued":
        await asyncio.sleep(0.005)
    return job.id, submitted


async def run_video(worker: Worker, request: dict) -> tuple[str, float]:
    job_id, submitted = await video(worker, request)
    done = await asyncio.to_thread(worker.wait, job_id, 3600)
    assert done is not None and done.status == "completed", done
    return job_id, time.perf_counter() - submitted


def output_bytes(worker: Worker, job_id: str) -> bytes:
    """The job's video file (its sidecar, which comes last, records timings)."""
    return Path(worker.store.get(job_id).outputs[0]).read_bytes()


async def beside(args, worker: Worker, conversations: Conversations, reasoner: Reasoner, request: dict) -> dict:
    """The video with chats issued while it runs: each chat's TTFT and where the video was when it started."""
    job_id, submitted = await video(worker, request)
    lent = worker.turns.lent

    async def one(i: int) -> dict:
        await asyncio.sleep(args.first_chat + i * args.interval)
        job = worker.store.get(job_id)
        phase = job.status if job.status != "in_progress" else f"step {job.progress}%"
        return {"chat": i, "started_s": time.perf_counter() - submitted, "video": phase} | await chat(
            conversations, reasoner, i, args.chat_tokens
        )

    tasks = [asyncio.create_task(one(i)) for i in range(args.chats)]
    done = await asyncio.to_thread(worker.wait, job_id, 3600)
    seconds = time.perf_counter() - submitted
    assert done is not None and done.status == "completed", done
    chats = [await t for t in tasks]
    return {"job": job_id, "seconds": seconds, "chats": chats, "lent": worker.turns.lent - lent}


async def measure(args, engine: Engine, worker: Worker) -> dict:
    conversations = Conversations(worker, max_pending=max(16, args.chats))
    reasoner = engine.reasoner
    try:
        await chat(conversations, reasoner, 0, 2)  # warm-up: kernels, the scheduler's graphs
        await run_video(worker, video_request(engine, args.size, 1))
        alone = [await chat(conversations, reasoner, i, args.chat_tokens) for i in range(args.chats)]
        request = video_request(engine, args.size, args.steps)
        first_job, video_alone = await run_video(worker, request)
        with_chats = await beside(args, worker, conversations, reasoner, request)
        identical = output_bytes(worker, first_job) == output_bytes(worker, with_chats["job"])
    finally:
        conversations.close()
    rows = []
    for a, b in zip(alone, with_chats["chats"], strict=True):
        rows.append(
            {
                "chat": b["chat"],
                "started_s": round(b["started_s"], 2),
                "video_then": b["video"],
                "ttft_alone_ms": round(1000 * a["ttft_s"], 1),
                "ttft_beside_ms": round(1000 * b["ttft_s"], 1),
                "extra_ms": round(1000 * (b["ttft_s"] - a["ttft_s"]), 1),
                "total_beside_s": round(b["total_s"], 2),
                "same_text": a["text"] == b["text"],
            }
        )
    return {
        "device": gpu_name(engine.device),
        "torch": torch.__version__,
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "compile": args.compile,
        "chat_tokens": args.chat_tokens,
        "video_alone_s": round(video_alone, 2),
        "video_beside_s": round(with_chats["seconds"], 2),
        "video_slowdown": round(with_chats["seconds"] / video_alone, 3),
        "video_bytes_identical": identical,
        "chat_units_lent": with_chats["lent"],
        "chats": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--first-chat", type=float, default=1.0, help="seconds into the job of the first chat")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between chats")
    parser.add_argument("--compile", action="store_true", help="compile the generation layers (compile='auto')")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args()
    device = default_device()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        engine = build_engine(args.preset, device, folder, args.compile)
        worker = Worker(engine, JobStore(folder / "jobs.db"), folder / "outputs", max_queue=8, retention_s=3600)
        worker.start()
        try:
            report = asyncio.run(measure(args, engine, worker))
        finally:
            worker.stop()
    print(json.dumps(report, indent=2))
    print(
        f"\n{report['device']}: {args.preset} {args.size} text2video, {args.steps} steps: {report['video_alone_s']} s "
        f"alone, {report['video_beside_s']} s with {args.chats} chats beside (x{report['video_slowdown']}); "
        f"outputs identical: {report['video_bytes_identical']}; chat units lent: {report['chat_units_lent']}"
    )
    header = ["chat", "started (s)", "video then", "TTFT alone (ms)", "TTFT beside (ms)", "extra (ms)", "same text"]
    keys = ["chat", "started_s", "video_then", "ttft_alone_ms", "ttft_beside_ms", "extra_ms", "same_text"]
    print_table(header, [[row[k] for k in keys] for row in report["chats"]])
    save_rows([report], args.json)


if __name__ == "__main__":
    main()
