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
