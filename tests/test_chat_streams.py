"""How replies reach the event loop: the scheduler's thread hands every stream's new text over once per step (not
a pool thread per stream waiting on its tokens), so a read request leaves the pool while it decodes; many
concurrent streams each get the reply they get alone (n, stop strings, logprobs, usage), a client that leaves frees
its row, and an error mid-reply ends the stream with it."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from test_server import LiveServer, wait_until

import cosmos3
from cosmos3.reasoning.decoding import Sampling
from cosmos3.reasoning.scheduler import Scheduler
from cosmos3.server.app import Settings
from cosmos3.server.chat import Conversations

GREEDY = {"temperature": 0, "presence_penalty": 0}


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", surfaces=["reasoner"])


@pytest.fixture()
def live(engine, tmp_path):
    server = LiveServer(engine, Settings(model_name="cosmos3-tiny", jobs_db=tmp_path / "j.db", outputs_dir=tmp_path))
    yield server
    server.stop()


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Conversation {i}: what happens when a cup falls off a table?"}]


def alone(engine, i: int, **kwargs):
    return engine.reasoner.complete([messages(i)], Sampling(**GREEDY, **kwargs))


def events(response: httpx.Response) -> list[dict]:
    """The data of a streamed reply's server-sent events, up to [DONE] (which must end it)."""
    lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def gather(chunks: list[dict], n: int) -> dict:
    """Per choice: its text, finish_reason and logprobs tokens; the usage chunk's counts."""
    text, finish, tokens = [""] * n, [None] * n, [[] for _ in range(n)]
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            i = choice["index"]
            text[i] += choice["delta"].get("content") or ""
            finish[i] = choice["finish_reason"] or finish[i]
            tokens[i] += [(e["token"], e["logprob"]) for e in (choice.get("logprobs") or {}).get("content", [])]
    return {"text": text, "finish": finish, "tokens": tokens, "usage": usage}


def test_many_concurrent_streams_each_get_their_alone_reply(engine, live):
    # Twelve streams with different settings at once: n choices, stop strings, logprobs, usage.
    asks = []
    for i in range(12):
        kwargs = {"max_tokens": 10 + 2 * i}
        if i % 4 == 1:
            kwargs["n"] = 2
        if i % 4 == 2:
            kwargs["logprobs"], kwargs["top_logprobs"] = True, 2
        if i % 4 == 3:  # a stop string the reply does contain
            kwargs["stop"] = [alone(engine, i, **kwargs)[0].text[6:8]]
        asks.append(kwargs)
    expected = [alone(engine, i, **kwargs) for i, kwargs in enumerate(asks)]
    got: dict[int, dict] = {}

    def ask(i: int) -> None:
        body = {"messages": messages(i), **GREEDY, **asks[i], "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            got[i] = gather(events(r), asks[i].get("n", 1))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, replies in enumerate(expected):
        assert got[i]["text"] == [r.text for r in replies], i
        assert got[i]["finish"] == [r.finish_reason for r in replies], i
        assert got[i]["usage"]["completion_tokens"] == sum(r.completion_tokens for r in replies), i
        assert got[i]["usage"]["prompt_tokens"] == replies[0].prompt_tokens, i
        if asks[i].get("logprobs"):
            want = [(e["token"], e["logprob"]) for e in replies[0].logprobs]
            assert [t for t, _ in got[i]["tokens"][0]] == [t for t, _ in want], i
            assert [lp for _, lp in got[i]["tokens"][0]] == pytest.approx([lp for _, lp in want], abs=1e-4), i
    conversations = live.app.state.conversations
    assert conversations.scheduler.most_active >= 4
    wait_until(lambda: conversations.pending == 0)


class Gate:
    """A stand-in for the job worker: its `exclusive` (the engine lock every scheduler step takes) waits until
    `open()`."""

    def __init__(self):
        self.opened = threading.Event()

    @contextmanager
    def exclusive(self):
        assert self.opened.wait(60)
        yield

    def open(self) -> None:
        self.opened.set()


async def reply(conversations: Conversations, reasoner, i: int, max_tokens: int) -> str:
    first, pieces, stop = await conversations.stream(reasoner, messages(i), Sampling(max_tokens, **GREEDY), {})
    text, (kind, value) = "", first
    while kind == "delta":
        text += value.text
        kind, value = await pieces.get()
    assert kind == "end", value
    return text


def test_a_read_request_leaves_the_pool_and_the_loop_is_woken_once_per_step(engine):
    """One pool thread reads four requests while the engine is held: none of them keeps the thread while it
    decodes (before, the first held it for its whole reply and the others waited). All four then decode in one
    batch, and the scheduler hands their tokens to the loop in one call per step, not one per token."""
    gate = Gate()
    conversations = Conversations(SimpleNamespace(exclusive=gate.exclusive), max_pending=8)
    conversations.pool = ThreadPoolExecutor(max_workers=1)
    reasoner, budgets = engine.reasoner, [12, 9, 16, 6]
    wakes = []

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: wakes.append(threading.current_thread().name) or original(*a, **k)
        tasks = [asyncio.ensure_future(reply(conversations, reasoner, i, b)) for i, b in enumerate(budgets)]
        scheduler = conversations.scheduler_for(reasoner)
        for _ in range(3000):  # until all four are read and wait for the engine (the first step holds it)
            if scheduler.waiting.qsize() == len(budgets):
                break
            await asyncio.sleep(0.01)
        assert scheduler.waiting.qsize() == len(budgets), "a request held the only pool thread"
        gate.open()
        return await asyncio.gather(*tasks)

    try:
        texts = asyncio.run(main())
        scheduler = conversations.scheduler
        assert scheduler.most_active == len(budgets)
        for i, b in enumerate(budgets):
            assert texts[i] == alone(engine, i, max_tokens=b)[0].text, i
        from_scheduler = wakes.count("cosmos3-decode")
        assert 0 < from_scheduler <= scheduler.steps + 1 < sum(budgets)  # at most one per step (+ the last step's)
        assert conversations.pending == 0
    finally:  # a failed test leaves nothing waiting
        gate.open()
        conversations.close()
        conversations.pool.shutdown(wait=False, cancel_futures=True)


def submitted_jobs(live, engine) -> list:
    """The scheduler's jobs, recorded as they are submitted; the scheduler decodes past the end of turn, so that
    only the budget or a cancellation ends a row."""
    scheduler = live.app.state.conversations.scheduler_for(engine.reasoner)
    scheduler.eos = set()
    jobs, submit = [], scheduler.submit
    scheduler.submit = lambda *a, **k: jobs.append(submit(*a, **k)) or jobs[-1]
    return jobs


def test_a_client_that_leaves_mid_stream_frees_its_row(engine, live):
    jobs = submitted_jobs(live, engine)
    body = {"messages": messages(0), "max_tokens": 20000, **GREEDY, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = (line for line in r.iter_lines() if line.startswith("data: {"))
        for _ in range(4):  # the role chunk and three pieces of the reply, then the client goes
            next(chunks)
    conversations, scheduler = live.app.state.conversations, live.app.state.conversations.scheduler
    wait_until(lambda: scheduler.active == 0 and conversations.pending == 0)
    (job,) = jobs
    assert job.row.cancelled.is_set() and job.generated < 20000
    assert job.row.finish_reason == "stop" and job.error is None


def test_an_error_mid_stream_ends_it_and_the_next_chat_works(engine, live, monkeypatch):
    jobs = submitted_jobs(live, engine)
    real = Scheduler.decode

    def decode(self, size, live_jobs):  # a decode step fails, when some text has been sent (the first tokens
        if self.steps == 12:  # of this reply are parts of characters)
            raise RuntimeError("the GPU fell over")
        return real(self, size, live_jobs)

    monkeypatch.setattr(Scheduler, "decode", decode)
    body = {"messages": messages(1), "max_tokens": 50, **GREEDY, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200  # the reply had begun: the error is its last event
        chunks = events(r)
    assert chunks[-1]["error"] == {"message": "the GPU fell over", "type": "InternalServerError"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1])  # some text came before
    conversations = live.app.state.conversations
    wait_until(lambda: conversations.pending == 0)
    assert str(jobs[0].error) == "the GPU fell over"
    monkeypatch.setattr(Scheduler, "decode", real)
    r = httpx.post(f"{live.url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_an_input_error_is_still_a_400_before_the_stream_starts(live):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    body = {"messages": [{"role": "user", "content": [image]}], "max_tokens": 4, "stream": True}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text
    wait_until(lambda: live.app.state.conversations.pending == 0)


def test_detokenize_is_the_tokenizers_decode(engine):
    """Streamed text is decoded in the tokenizer's Rust backend (fewer microseconds per token on the decode
    thread): the same text as transformers' `decode`, special tokens, partial characters and unknown ids too."""
    reasoner = engine.reasoner
    assert reasoner._backend is not None  # the tiny tokenizer is a fast one: the backend path is what is tested
    tokenizer = reasoner.tokenizer
    rng = np.random.default_rng(0)
    vocab = reasoner.transformer.config.vocab_size  # more ids than the tokenizer knows
    specials = [*reasoner.eos_token_ids, reasoner.image_token_id, reasoner.video_token_id]
    text = tokenizer("Été: 日本語 ✓ a cup falls.", add_special_tokens=False)["input_ids"]
    windows = [text, text[:3], specials + text, [int(i) for i in rng.integers(0, vocab, 40)]]
    windows += [[int(i) for i in rng.choice(specials + text, 6)] for _ in range(50)]
    for ids in windows:
        assert reasoner.detokenize(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids
