"""Chats beside a running video (issue 14, item 2): the generation batch lends the engine to a waiting conversation
between transformer layers (`cosmos3.turns.EngineTurns`), so a chat does not wait for the video; neither side's
numbers change.

The server tests hold a video between two of its layers with `LayerGate` (a denoising step that takes minutes, as a
720p one does on a real model), lending the engine to every conversation that waits meanwhile; no test sleeps to
synchronise."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import test_server as base
from test_server import wait_until

from cosmos3.reasoning.decoding import Sampling
from cosmos3.turns import EngineTurns

engine, settings, live = base.engine, base.settings, base.live  # the shared fixtures

GREEDY = {"temperature": 0, "presence_penalty": 0}
VIDEO = {"prompt": "a robot arm stacks cups", "size": "64x48", "num_frames": "9", "num_inference_steps": "12"}
MESSAGES = [{"role": "user", "content": "What happens when a cup falls off a table?"}]


def start(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def finish(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a holder of the engine never finished (deadlock)"


# ------------------------------------------------------------------------------------------- the turns
def test_yield_point_costs_nothing_when_nobody_waits():
    syncs = []
    turns = EngineTurns(synchronize=lambda: syncs.append(1))
    with turns.long():
        for _ in range(100):
            turns.yield_point()
        assert turns.long_held and not turns.short_held
    assert syncs == [] and turns.lent == 0 and not turns.long_held


def test_a_waiting_short_holder_gets_the_engine_at_the_next_yield_point_and_gives_it_back():
    events: list[str] = []
    turns = EngineTurns(synchronize=lambda: events.append("sync"))

    def chat() -> None:
        with turns.short():
            events.append("chat")

    with turns.long():
        thread = start(chat)
        wait_until(lambda: turns.waiting == 1)
        events.append("layer 1")
        assert events == ["layer 1"]  # the long holder's units run undisturbed
        turns.yield_point()
        events.append("layer 2")
        assert turns.long_held and not turns.short_held
    finish(thread)
    assert events == ["layer 1", "sync", "chat", "layer 2"] and turns.lent == 1


def test_short_holders_that_keep_coming_get_one_unit_per_yield_point():
    turns = EngineTurns()
    position: list[object] = [None]  # the long holder's place: which yield point, or "done"
    units: list[object] = []
    stop = threading.Event()

    def greedy() -> None:  # like the scheduler's loop: asks again as soon as its unit is done
        while not stop.is_set():
            with turns.short():
                units.append(position[0])

    def batch() -> None:
        with turns.long():
            threads.extend(start(greedy) for _ in range(3))
            wait_until(lambda: turns.waiting == 3)
            for i in range(20):
                position[0] = i
                turns.yield_point()
                assert turns.long_held and not turns.short_held  # back with the long holder
            position[0] = "done"
            stop.set()

    threads: list[threading.Thread] = []
    finish(start(batch))
    finish(*threads)
    during = [u for u in units if u != "done"]
    assert during and len(during) == turns.lent
    assert max(Counter(during).values()) == 1  # never two short units at one yield point


def test_a_new_batch_waits_at_most_one_short_unit():
    turns = EngineTurns()
    order: list[str] = []
    release = threading.Event()

    def unit(name: str, gate: threading.Event | None = None) -> Callable[[], None]:
        def run() -> None:
            with turns.short():
                order.append(name)
                if gate is not None:
                    gate.wait(30)

        return run

    def batch() -> None:
        with turns.long():
            order.append("batch")

    first = start(unit("a", release))
    wait_until(lambda: turns.short_held)
    long = start(batch)
    wait_until(lambda: turns.waiting_long == 1)
    second = start(unit("b"))
    wait_until(lambda: turns.waiting == 1)
    release.set()
    finish(first, long, second)
    assert order == ["a", "batch", "b"]


def test_a_long_holder_that_ends_while_a_short_one_waits_hands_over():
    turns = EngineTurns()
    served = threading.Event()

    def chat() -> None:
        with turns.short():
            served.set()

    with turns.long():
        thread = start(chat)
        wait_until(lambda: turns.waiting == 1)
    finish(thread)
    assert served.is_set() and turns.lent == 0


def test_exceptions_release_the_engine():
    turns = EngineTurns()
    errors: list[BaseException] = []

    def failing_chat() -> None:
        try:
            with turns.short():
                raise RuntimeError("a chat failed")
        except RuntimeError as exc:
            errors.append(exc)

    with turns.long():
        thread = start(failing_chat)
        wait_until(lambda: turns.waiting == 1)
        turns.yield_point()  # returns: the failed unit ended its turn
        assert turns.long_held and not turns.short_held
    finish(thread)
    assert len(errors) == 1

    served = threading.Event()

    def chat() -> None:
        with turns.short():
            served.set()

    with pytest.raises(RuntimeError):
        with turns.long():
            thread = start(chat)
            wait_until(lambda: turns.waiting == 1)
            raise RuntimeError("a batch failed")
    finish(thread)
    assert served.is_set()
    with turns.long():  # free for both kinds afterwards
        pass
    with turns.short():
        pass


def test_only_the_long_holders_thread_yields_and_it_can_take_short_units_itself():
    turns = EngineTurns()

    def chat() -> None:
        with turns.short():
            pass

    with turns.long():
        thread = start(chat)
        wait_until(lambda: turns.waiting == 1)
        finish(start(turns.yield_point))  # another thread: a no-op, no hand-over
        assert turns.lent == 0 and turns.waiting == 1
        with turns.short():  # the long holder's own short unit: it already has the engine
            pass
        turns.yield_point()
    finish(thread)
    assert turns.lent == 1


# ------------------------------------------------------------------------------------------- the server
class LayerGate:
    """Holds the next video job between two of its transformer layers (its `at`-th yield point) until `open()`,
    lending the engine to every conversation that waits meanwhile."""

    def __init__(self, worker, monkeypatch, at: int = 6):
        self.entered, self.opened = threading.Event(), threading.Event()
        self.calls = 0
        original = worker.turns.yield_point

        def gated() -> None:
            self.calls += 1
            if self.calls == at:
                self.entered.set()
                while not self.opened.wait(0.005):
                    original()
            original()

        monkeypatch.setattr(worker.turns, "yield_point", gated)

    def open(self) -> None:
        self.opened.set()


def alone(engine, max_tokens: int) -> str:
    return engine.reasoner.complete([MESSAGES], Sampling(max_tokens=max_tokens, **GREEDY))[0].text


def chat(url: str, max_tokens: int, stream: bool = False, messages: list | None = None) -> httpx.Response:
    body = {"messages": messages or MESSAGES, "max_tokens": max_tokens, "stream": stream, **GREEDY}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def streamed_text(r: httpx.Response) -> str:
    import json

    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [json.loads(line) for line in lines]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def status(url: str, job_id: str) -> str:
    return httpx.get(f"{url}/v1/videos/{job_id}", timeout=5).json()["status"]


def test_chats_complete_while_a_video_is_in_progress(engine, live, monkeypatch):
    worker = live.app.state.worker
    gate = LayerGate(worker, monkeypatch)
    job = httpx.post(f"{live.url}/v1/videos", data={**VIDEO, "seed": "1"}).json()
    assert gate.entered.wait(60)  # the video is between two layers of its first pass, and stays there

    r = chat(live.url, 8)
    assert r.status_code == 200, r.text
    assert status(live.url, job["id"]) == "in_progress"  # the reply came while the video was generating
    assert r.json()["choices"][0]["message"]["content"] == alone(engine, 8)

    r = chat(live.url, 8, stream=True)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert status(live.url, job["id"]) == "in_progress"
    assert streamed_text(r) == alone(engine, 8)

    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    assert chat(live.url, 4, messages=bad).status_code == 400  # a chat's error leaves the video alone
    assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
    assert status(live.url, job["id"]) == "in_progress" and worker.turns.lent >= 2

    gate.open()
    assert worker.wait(job["id"], 120).status == "completed"
    assert engine.transformer.between_layers is None  # the hooks last as long as the batch
    assert not engine.generator.parts.video.vae.decoder._forward_hooks
    assert engine.generator.parts.video.between_chunks is None


def test_interleaved_chats_change_no_number_of_the_video_or_the_chat(engine, live, monkeypatch):
    worker = live.app.state.worker
    request = {**VIDEO, "seed": "5"}
    first = httpx.post(f"{live.url}/v1/videos", data=request).json()
    assert worker.wait(first["id"], 120).status == "completed"
    by_itself = httpx.get(f"{live.url}/v1/videos/{first['id']}/content").content

    gate = LayerGate(worker, monkeypatch)
    job = httpx.post(f"{live.url}/v1/videos", data=request).json()
    assert gate.entered.wait(60)
    budgets = [40, 24]
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        r = chat(live.url, budgets[i], stream=i == 0)
        replies[i] = streamed_text(r) if i == 0 else r.json()["choices"][0]["message"]["content"]

    threads = [start(lambda i=i: ask(i)) for i in range(len(budgets))]
    wait_until(lambda: worker.turns.lent >= 2)  # both chats are under way, between the video's layers...
    lent = worker.turns.lent
    gate.open()  # ...and keep decoding at the layers that follow
    assert worker.wait(job["id"], 120).status == "completed"
    assert worker.turns.lent > lent  # chat units ran between later layers too, not only at the gate
    finish(*threads)
    assert httpx.get(f"{live.url}/v1/videos/{job['id']}/content").content == by_itself
    for i, budget in enumerate(budgets):
        assert replies[i] == alone(engine, budget), i


def test_the_video_yields_after_every_layer(engine, live, monkeypatch):
    worker = live.app.state.worker
    calls = [0]
    original = worker.turns.yield_point
    monkeypatch.setattr(worker.turns, "yield_point", lambda: calls.__setitem__(0, calls[0] + 1) or original())
    job = httpx.post(f"{live.url}/v1/videos", data={**VIDEO, "num_inference_steps": "3"}).json()
    assert worker.wait(job["id"], 120).status == "completed"
    assert calls[0] >= 3 * engine.config.num_hidden_layers  # every denoising pass, layer by layer


def test_a_video_that_fails_while_a_chat_waits_leaves_it_the_engine(engine, live, monkeypatch):
    worker = live.app.state.worker
    calls = [0]

    def failing() -> None:
        calls[0] += 1
        if calls[0] == 6:
            wait_until(lambda: worker.waiting_for_engine >= 1)  # a conversation waits
            raise RuntimeError("the device fell over")

    monkeypatch.setattr(worker.turns, "yield_point", failing)
    job = httpx.post(f"{live.url}/v1/videos", data=VIDEO).json()
    result: dict[str, httpx.Response] = {}
    thread = start(lambda: result.update(r=chat(live.url, 4)))
    done = worker.wait(job["id"], 120)
    assert done.status == "failed" and "the device fell over" in done.error["message"]
    finish(thread)
    assert result["r"].status_code == 200
    assert not worker.turns.long_held and not worker.turns.short_held


def test_a_video_cancelled_while_it_lends_the_engine_is_cancelled(engine, live, monkeypatch):
    worker = live.app.state.worker
    gate = LayerGate(worker, monkeypatch)
    job = httpx.post(f"{live.url}/v1/videos", data=VIDEO).json()
    assert gate.entered.wait(60)
    assert chat(live.url, 4).status_code == 200
    assert httpx.delete(f"{live.url}/v1/videos/{job['id']}").status_code == 409  # running: stops at its next step
    gate.open()
    assert worker.wait(job["id"], 120).status == "cancelled"
    assert chat(live.url, 4).status_code == 200
