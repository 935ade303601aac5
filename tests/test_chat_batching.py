"""Continuous batching: requests join and leave one running batch mid-decode, and each gets the greedy tokens it gets
alone; the server's chat path decodes concurrent conversations together."""

from __future__ import annotations

import queue
import threading

import pytest
from openai import OpenAI
from test_server import LiveServer

import cosmos3
from cosmos3.reasoning.decoding import Row, Sampling, token_stream
from cosmos3.reasoning.scheduler import END, Scheduler
from cosmos3.server.app import Settings

GREEDY = {"temperature": 0, "presence_penalty": 0}
CONVERSATIONS = [
    [{"role": "user", "content": "What happens when a cup falls off a table?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to five, slowly, and explain each number in a long sentence."}],
    [{"role": "user", "content": "hi"}],
]


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", surfaces=["reasoner"])


def alone(engine, messages, max_tokens, **kwargs):
    return engine.reasoner.complete([messages], Sampling(max_tokens=max_tokens, **GREEDY, **kwargs))[0]


def test_requests_joining_and_leaving_mid_decode_get_their_alone_tokens(engine):
    reasoner = engine.reasoner
    model, eos = reasoner.transformer, reasoner.eos_token_ids
    # A narrow cache, so that compaction and growth happen while rows come and go.
    scheduler = Scheduler(model, eos, slots=3, columns=4, threaded=False)
    budgets = [30, 9, 25, 12]
    joins = {0: [0], 3: [1], 5: [2], 7: [3]}  # step -> conversations joining then (3 waits for a free row)
    prompts = [reasoner.encode(c) for c in CONVERSATIONS]
    params = [Sampling(max_tokens=b, **GREEDY).check() for b in budgets]
    out: queue.Queue = queue.Queue()
    jobs = {}
    for step in range(200):
        for i in joins.get(step, []):
            jobs[i] = scheduler.submit(prompts[i], params[i], Row(0), out, i)
        if step > max(joins) and not scheduler.active and scheduler.waiting.empty():
            break
        scheduler.step()
    assert scheduler.most_active == 3 and len(jobs) == 4
    got: dict[int, list[int]] = {i: [] for i in jobs}
    ended = set()
    while not out.empty():
        i, item = out.get()
        if item is END:
            ended.add(i)
        else:
            got[i].append(item.id)
    assert ended == set(jobs)
    for i, prompt in enumerate(prompts):
        expected = [t[0].id for t in token_stream(model, [prompt], params[i], eos) if t[0] is not None]
        assert got[i] == expected, i
        assert jobs[i].row.finish_reason == ("length" if len(expected) == budgets[i] else "stop")


def test_concurrent_chats_are_batched_and_each_equals_alone(engine, tmp_path):
    server = LiveServer(engine, Settings(model_name="cosmos3-tiny", jobs_db=tmp_path / "j.db", outputs_dir=tmp_path))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        budgets = [24, 8, 16, 12]
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            stream = client.chat.completions.create(
                model="cosmos3-tiny",
                messages=CONVERSATIONS[i],
                max_tokens=budgets[i],
                stream=True,
                **GREEDY,
            )
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(4):
            assert results[i] == alone(engine, CONVERSATIONS[i], budgets[i]).text, i
        assert server.app.state.conversations.scheduler.most_active >= 2
    finally:
        server.stop()


def _image_uri(seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_concurrent_image_chats_are_embedded_together_and_each_equals_alone(engine, tmp_path):
    server = LiveServer(engine, Settings(model_name="cosmos3-tiny", jobs_db=tmp_path / "j.db", outputs_dir=tmp_path))
    try:
        scheduler = server.app.state.conversations.scheduler_for(engine.reasoner)
        calls: list[int] = []
        release = threading.Event()

        def encode(tokenized):  # counts the prompts of each call; the first call waits until all have arrived
            calls.append(len(tokenized))
            release.wait(60)
            return engine.reasoner.embed_many(tokenized)

        scheduler.encode = encode
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _image_uri(i)}},
                        {"type": "text", "text": f"What is in picture {i}?"},
                    ],
                }
            ]
            for i in range(4)
        ]
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            reply = client.chat.completions.create(
                model="cosmos3-tiny", messages=conversations[i], max_tokens=6, **GREEDY
            )
            results[i] = reply.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for _ in range(600):  # until the first call is embedding and every other prompt waits in the queue
            if calls and scheduler.waiting.qsize() + len(scheduler.queued) >= 4 - calls[0]:
                break
            threading.Event().wait(0.05)
        release.set()
        for t in threads:
            t.join(120)
        # Those that queued behind the first call went in one call (under load two can arrive in time for the first).
        assert sum(calls) == 4 and len(calls) <= 2, calls
        for i in range(4):
            assert results[i] == alone(engine, conversations[i], 6).text, i
    finally:
        server.stop()
