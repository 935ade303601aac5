"""The continuous-batching scheduler: chunked prefill equals one pass (DeepStack included), a long prompt is prefilled
between the other streams' decode steps, rows with different settings sample as they would alone, the batched
sampler draws what `torch.multinomial` draws, the ring cache wraps and grows, and the Python API decodes through it."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import cosmos3
from cosmos3.model.transformer import KVCache
from cosmos3.reasoning.decoding import Prompt, Row, Sampler, Sampling, prefill, prompt_logits, token_stream
from cosmos3.reasoning.scheduler import END, MAX_SLOTS, Scheduler

GREEDY = {"temperature": 0, "presence_penalty": 0}


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", surfaces=["reasoner"])


def media_messages(seed: int = 0) -> list[dict]:
    """Text, an image and an 8-frame video: visual tokens in two runs, with DeepStack features."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    frames = list(rng.integers(0, 255, (8, 64, 96, 3), dtype=np.uint8))
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "with"},
        {"type": "video_url", "video_url": {"url": frames}, "fps": 4.0},
        {"type": "text", "text": "and say what changes."},
    ]
    return [{"role": "user", "content": content}]


def text_prompt(engine, text: str) -> Prompt:
    return engine.reasoner.encode([{"role": "user", "content": text}])


def alone(engine, prompt: Prompt, params: Sampling, seed: int = 0) -> list[int]:
    """The static path (`token_stream`, one prompt, no scheduler): the oracle."""
    reasoner = engine.reasoner
    rows = [Row(seed)]
    stream = token_stream(reasoner.transformer, [prompt], params, reasoner.eos_token_ids, rows)
    return [t[0].id for t in stream if t[0] is not None]


def drain(out: queue.Queue) -> dict[int, list]:
    got: dict[int, list] = {}
    while not out.empty():
        index, item = out.get()
        got.setdefault(index, [])
        if item is not END:
            got[index].append(item)
    return got


def run_all(scheduler: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if scheduler.idle:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("chunk", [5, 13])
def test_chunked_prefill_equals_one_pass(engine, chunk):
    model = engine.reasoner.transformer
    prompt = engine.reasoner.encode(media_messages())
    length, visual = len(prompt.input_ids), prompt.visual_mask.tolist()
    assert prompt.deepstack and length > 4 * chunk
    # Some chunk boundary cuts a run of visual tokens, so that the DeepStack features must be sliced per chunk.
    assert any(visual[b - 1] and visual[b] for b in range(chunk, length, chunk))
    cache = KVCache(model.config, 1, length, prompt.embeds.device, model.dtype)
    pieces = []
    while cache.length < length:
        pieces.append(prefill(model, prompt, cache, min(cache.length + chunk, length)))
    chunked = model.lm_head(torch.cat(pieces, dim=1)[0]).float()
    whole = prompt_logits(model, prompt)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert torch.equal(chunked.argmax(-1), whole.argmax(-1))
    # The DeepStack features matter here: without them the logits are another matter.
    bare = Prompt(prompt.input_ids, prompt.positions, prompt.embeds)
    assert (prompt_logits(model, bare) - whole).abs().max() > 1e-3


def test_a_long_prompt_is_prefilled_between_decode_steps(engine):
    reasoner = engine.reasoner
    chunk = 7
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=4, threaded=False, prefill_chunk=chunk)
    text, video = text_prompt(engine, "Count to five, slowly."), reasoner.encode(media_messages(1))
    params = [Sampling(max_tokens=40, **GREEDY).check(), Sampling(max_tokens=12, **GREEDY).check()]
    out: queue.Queue = queue.Queue()
    first = scheduler.submit(text, params[0], Row(0), out, 0)
    scheduler.step()  # the text prompt joins (nobody to stall: one pass) and gives its first token
    second = scheduler.submit(video, params[1], Row(0), out, 1)
    tokens_while_prefilling = 0
    while not second.joined and not second.row.done:
        before = first.generated
        scheduler.step()
        tokens_while_prefilling += first.generated - before
    chunks = -(-len(video.input_ids) // chunk)
    assert chunks >= 5 and tokens_while_prefilling >= chunks - 1  # the text stream kept decoding meanwhile
    run_all(scheduler)
    got = drain(out)
    assert first.error is None and second.error is None
    assert [t.id for t in got[0]] == alone(engine, text, params[0])
    assert [t.id for t in got[1]] == alone(engine, video, params[1])


SETTINGS = [
    dict(temperature=0, presence_penalty=0),
    dict(temperature=0.9, top_k=5, top_p=0.9, presence_penalty=0, seed=3),
    dict(temperature=0.7, top_k=20, top_p=0.8, presence_penalty=1.5, frequency_penalty=0.5, seed=4),
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.3, presence_penalty=0, seed=5),
    dict(temperature=0, presence_penalty=0, logprobs=True, top_logprobs=3),
]


def test_rows_with_different_settings_sample_as_they_would_alone(engine):
    reasoner = engine.reasoner
    prompts = [text_prompt(engine, t) for t in ("hi", "Name a colour.", "What falls?", "Why?", "Go on.")]
    params = [Sampling(max_tokens=14, **s).check() for s in SETTINGS]

    def decode(indices: list[int]) -> dict[int, list]:
        scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=8, threaded=False)
        out: queue.Queue = queue.Queue()
        for i in indices:
            scheduler.submit(prompts[i], params[i], Row(params[i].seed), out, i)
        run_all(scheduler)
        return drain(out)

    together = decode(list(range(len(SETTINGS))))
    for i in range(len(SETTINGS)):
        (single,) = decode([i]).values()
        assert [t.id for t in together[i]] == [t.id for t in single], i
        if params[i].logprobs:
            assert [t.top[0][0] for t in single] == [t.id for t in single]  # greedy takes the most likely token
            for a, b in zip(together[i], single, strict=True):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and len(a.top) == 3
    # The oracle for the seeded ones as well: the static path with the same settings.
    for i in (0, 1, 2):
        assert [t.id for t in together[i]] == alone(engine, prompts[i], params[i], params[i].seed), i


def reference_draw(logits: torch.Tensor, params: Sampling, generator: torch.Generator, seen, counts) -> int:
    """One row, the way the sampler did it before it was batched: scalar settings, `torch.multinomial`."""
    x = logits.clone()
    if params.repetition_penalty != 1.0:
        x = torch.where(seen, torch.where(x < 0, x * params.repetition_penalty, x / params.repetition_penalty), x)
    x -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
    if params.temperature == 0:
        return int(x.argmax())
    x = x / params.temperature
    if params.top_k > 0:
        x = x.masked_fill(x < x.topk(min(params.top_k, x.shape[-1])).values[-1], float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        sorted_x = sorted_x.masked_fill(probs.cumsum(-1) - probs > params.top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    return int(torch.multinomial(x.softmax(-1)[None], 1, generator=generator)[0, 0])


def test_the_batched_sampler_draws_what_multinomial_draws():
    vocab, rows = 384, len(SETTINGS)
    params = [Sampling(max_tokens=8, **s).check() for s in SETTINGS]
    prompt_ids = [torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(b)) for b in range(rows)]
    sampler = Sampler(rows + 2, vocab, "cpu")  # more rows than used: the others must not matter
    for b in range(rows):
        sampler.start(b, params[b], Row(params[b].seed), prompt_ids[b])
    generators = [torch.Generator().manual_seed(p.seed) for p in params]
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for b, ids in enumerate(prompt_ids):
        seen[b, ids] = True
    counts = torch.zeros(rows, vocab)
    for step in range(8):
        logits = torch.randn(rows + 2, vocab, generator=torch.Generator().manual_seed(100 + step)) * 3
        got = sampler.tokens(sampler(logits, list(range(rows))), range(rows))
        for b in range(rows):
            expected = reference_draw(logits[b], params[b], generators[b], seen[b], counts[b])
            assert got[b].id == expected, (step, b)
            seen[b, expected], counts[b, expected] = True, counts[b, expected] + 1


def test_the_ring_grows_when_a_sequence_outgrows_it_and_wraps_in_place(engine):
    reasoner = engine.reasoner
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=2, columns=20, threaded=False)
    long, short = text_prompt(engine, "Tell a long story."), text_prompt(engine, "hi")
    params = [Sampling(max_tokens=n, **GREEDY).check() for n in (70, 7, 12)]
    out: queue.Queue = queue.Queue()
    # A sequence longer than the first ring: the ring is reallocated (the others' columns kept) ...
    scheduler.submit(long, params[0], Row(0), out, 0)
    scheduler.submit(short, params[1], Row(0), out, 1)
    rings = set()
    while not scheduler.idle:
        scheduler.step()
        rings.add(id(scheduler.ring))
    assert len(rings) >= 2
    max_width = scheduler.ring.width
    # ... then short ones come and go, two at a time, until the write column has gone round the same buffers (the
    # first of them, alone, starts a narrower ring: the wide one would make every step attend over unused columns).
    ring, wrapped, index = None, False, 2
    for _ in range(400):
        while scheduler.active + len(scheduler.queued) + scheduler.waiting.qsize() < 2:
            scheduler.submit(short, params[1 + index % 2], Row(0), out, index)  # 7 or 12 tokens: they overlap
            index += 1
        column = scheduler.column
        scheduler.step()
        ring = ring or scheduler.ring
        wrapped = wrapped or (scheduler.ring is ring and column == ring.width - 1 and scheduler.column == 0)
        if wrapped and index > 20:
            break
    assert wrapped and scheduler.ring is ring
    assert ring.width < max_width  # narrower than the ring the long sequence needed
    run_all(scheduler)
    got = drain(out)
    expected = {n: alone(engine, short, params[n]) for n in (1, 2)}
    assert [t.id for t in got[0]] == alone(engine, long, params[0])
    for i in range(1, index):
        assert [t.id for t in got[i]] == expected[1 if i == 1 else 1 + i % 2], i


def test_a_failing_prefill_fails_only_its_job(engine):
    reasoner = engine.reasoner
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=4, threaded=False)
    good = text_prompt(engine, "hi")
    hidden = good.embeds.shape[-1]
    bad = Prompt(good.input_ids, good.positions, good.embeds.new_zeros(len(good.input_ids), hidden + 1))
    params = Sampling(max_tokens=8, **GREEDY).check()
    out: queue.Queue = queue.Queue()
    ok = scheduler.submit(good, params, Row(0), out, 0)
    scheduler.step()
    broken = scheduler.submit(bad, params, Row(0), out, 1)
    run_all(scheduler)
    assert broken.error is not None and ok.error is None
    assert [t.id for t in drain(out)[0]] == alone(engine, good, params)


def test_the_python_api_decodes_through_the_scheduler(engine):
    conversations = [[{"role": "user", "content": t}] for t in ("hi", "Name a colour.", "What happens next?")]
    conversations.append(media_messages(2))
    before = engine.reasoner.scheduler.steps
    texts = engine.reason_batch(conversations, max_tokens=10, **GREEDY)
    assert engine.reasoner.scheduler.steps > before
    tokenizer = engine.reasoner.tokenizer
    for conversation, text in zip(conversations, texts, strict=True):
        prompt = engine.reasoner.encode(conversation)
        ids = alone(engine, prompt, Sampling(max_tokens=10, **GREEDY).check())
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_slots_are_bounded(engine):
    reasoner = engine.reasoner
    with pytest.raises(ValueError, match="slots"):
        Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=MAX_SLOTS + 1)


def test_seeded_choices_and_logprobs_equal_the_static_path(engine):
    reasoner = engine.reasoner
    messages = [{"role": "user", "content": "Describe a kitchen."}]
    params = Sampling(max_tokens=10, temperature=1.0, top_k=8, seed=5, n=3, logprobs=True, top_logprobs=2).check()
    replies = reasoner.complete([messages], params)
    prompt = reasoner.encode(messages)
    rows = [Row(5 + i) for i in range(3)]
    steps = list(token_stream(reasoner.transformer, [prompt] * 3, params, reasoner.eos_token_ids, rows))
    for i, reply in enumerate(replies):
        tokens = [step[i] for step in steps if step[i] is not None]
        assert reply.text == reasoner.tokenizer.decode([t.id for t in tokens], skip_special_tokens=True), i
        assert [e["logprob"] for e in reply.logprobs] == pytest.approx([t.logprob for t in tokens], abs=1e-5)
        assert [len(e["top_logprobs"]) for e in reply.logprobs] == [2] * len(tokens)


def test_callers_in_several_threads_share_the_python_apis_batch(engine):
    conversations = ["hi", "Name a colour.", "Count to three.", "What falls?"]
    singles = [engine.reason(c, max_tokens=12, **GREEDY) for c in conversations]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = engine.reason(conversations[i], max_tokens=12, **GREEDY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(conversations))] == singles


def test_embed_many_equals_embedding_each_prompt(engine):
    reasoner = engine.reasoner
    tokenized = [reasoner.tokenize(media_messages(seed)) for seed in range(3)]
    tokenized.insert(1, reasoner.tokenize([{"role": "user", "content": "only text"}]))
    together = reasoner.embed_many(tokenized)
    for t, got in zip(tokenized, together, strict=True):
        one = reasoner.embed(t)
        assert torch.equal(got.input_ids, one.input_ids)
        torch.testing.assert_close(got.embeds, one.embeds, atol=1e-5, rtol=1e-5)
        assert (got.deepstack is None) == (one.deepstack is None)
        if one.deepstack is not None:
            assert torch.equal(got.visual_mask, one.visual_mask)
            for a, b in zip(got.deepstack, one.deepstack, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class CountingEncoder:
    """`Reasoner.embed_many`, counting its calls and the prompts of each; `bad` prompts (by identity) raise."""

    def __init__(self, reasoner, bad: tuple = ()):
        self.reasoner, self.bad, self.calls = reasoner, bad, []

    def __call__(self, tokenized: list) -> list[Prompt]:
        self.calls.append(len(tokenized))
        if any(any(t is b for b in self.bad) for t in tokenized):
            raise ValueError("unreadable media")
        return self.reasoner.embed_many(tokenized)


def test_queued_prompts_are_embedded_together_and_decode_as_alone(engine):
    reasoner = engine.reasoner
    encoder = CountingEncoder(reasoner)
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=4, threaded=False, encode=encoder)
    params = Sampling(max_tokens=6, **GREEDY).check()
    tokenized = [reasoner.tokenize(media_messages(seed)) for seed in range(3)]
    out: queue.Queue = queue.Queue()
    jobs = [scheduler.submit(t, params, Row(0), out, i) for i, t in enumerate(tokenized)]
    # A prompt shared by two choices (n=2) is embedded once.
    jobs.append(scheduler.submit(tokenized[0], params, Row(0), out, 3))
    run_all(scheduler)
    assert encoder.calls == [3]  # one call for every queued prompt, each distinct prompt once
    got = drain(out)
    for i, job in enumerate(jobs):
        assert job.error is None
        expected = alone(engine, reasoner.embed(tokenized[i % 3]), params)
        assert [t.id for t in got[i]] == expected


def test_queued_prompts_wait_for_free_rows_to_be_embedded(engine):
    reasoner = engine.reasoner
    encoder = CountingEncoder(reasoner)
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=2, threaded=False, encode=encoder)
    params = Sampling(max_tokens=4, **GREEDY).check()
    out: queue.Queue = queue.Queue()
    jobs = [scheduler.submit(reasoner.tokenize(media_messages(s)), params, Row(0), out, s) for s in range(5)]
    scheduler.step()
    assert encoder.calls == [2]  # only as many as there are rows: the others are embedded as rows free up
    assert sum(j.embedded for j in jobs) == 2
    run_all(scheduler)
    assert sum(encoder.calls) == 5 and all(j.error is None for j in jobs)


def test_a_prompt_that_fails_to_embed_fails_only_its_jobs(engine):
    reasoner = engine.reasoner
    tokenized = [reasoner.tokenize(media_messages(seed)) for seed in range(3)]
    encoder = CountingEncoder(reasoner, bad=(tokenized[1],))
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=4, threaded=False, encode=encoder)
    params = Sampling(max_tokens=3, **GREEDY).check()
    out: queue.Queue = queue.Queue()
    jobs = [scheduler.submit(t, params, Row(0), out, i) for i, t in enumerate(tokenized)]
    run_all(scheduler)
    assert encoder.calls == [3, 1, 1, 1]  # the batch failed, then each alone
    assert isinstance(jobs[1].error, ValueError)
    assert jobs[0].error is None and jobs[2].error is None
    got = drain(out)
    assert len(got[0]) == len(got[2]) == 3 and got[1] == []


def test_a_cancelled_request_is_never_embedded(engine):
    reasoner = engine.reasoner
    encoder = CountingEncoder(reasoner)
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, slots=4, threaded=False, encode=encoder)
    gone = threading.Event()
    decode = reasoner.prepare([media_messages()], Sampling(max_tokens=3, n=2, **GREEDY), cancelled=gone)
    gone.set()  # the client left before its prompt's turn
    deltas = list(reasoner.decode_scheduled(decode, scheduler))
    assert encoder.calls == [] and scheduler.idle
    assert [d.finish_reason for d in deltas] == ["stop", "stop"]
    assert all(d.completion_tokens == 0 for d in deltas)


def test_an_unembedded_prompt_needs_an_encoder(engine):
    reasoner = engine.reasoner
    scheduler = Scheduler(reasoner.transformer, reasoner.eos_token_ids, threaded=False)
    with pytest.raises(TypeError, match="encode"):
        scheduler.submit(reasoner.tokenize(media_messages()), Sampling(**GREEDY).check(), Row(0), queue.Queue())
