"""Continuous batching for the Reasoner: one decode loop that requests join and leave at any step.

The batch is a KV cache of rows used as a ring of columns: every step, every row writes the same column (the
static-shape `Cosmos3Transformer.decode_step`, a CUDA graph on a GPU), which then advances modulo the width, and a
per-row mask says which columns each row attends to. A row's sequence is the arc of columns before the write
column; keys carry their own rotary positions and attention sums over keys, so where a key sits does not matter.
A request joins by being prefilled on its own (in chunks while others decode, so that a long video prompt does not
stall them) and having its keys and values copied into a free row, on the arc that ends at the write column, so
that from its first decode step on it sees exactly what it would see decoding alone. A finished, cancelled or
stopped request gives its row back at once. The cache is reallocated only when a sequence outgrows the ring or
more rows are needed; otherwise its addresses, and so the captured graphs, stay the same.

A request may arrive not yet embedded (token ids and the processor's pixels, no vision features): each step first
embeds the queued ones that rows are free for, all in one call of the `encode` it was given (one vision-tower pass
for all their images and videos, instead of one pass each).

Each step prefills waiting requests within a token budget, samples every running row's next token in one
`Sampler` call (each row with its own settings, generator and grammar), launches the next decode step, and only
then reads the tokens back on the host and hands them out, so that the host's work overlaps the GPU's. A step
runs over the smallest power of two of rows that holds every running one, each size with its own graph. A
request's greedy tokens equal running it alone.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from cosmos3.model.transformer import Cosmos3Transformer, KVCache
from cosmos3.reasoning.decoding import (
    Batch,
    Prompt,
    Row,
    Sampler,
    Sampling,
    Token,
    grammar_error,
    graphable,
    prefill,
)

END = object()  # the last item of a request's queue
logger = logging.getLogger(__name__)

# Prompt tokens prefilled per step while other requests decode: vLLM V1's `max_num_batched_tokens` default for its
# OpenAI server on GPUs of 70 GiB and more (8192; 2048 on smaller ones, vllm/engine/arg_utils.py). An 8192-token
# chunk of Nano (8B parameters, 2 x 8e9 x 8192 = 131 TFLOP) is about 0.2 s on an H100/H200, so a running stream's
# next token waits that long while prompts join. Measured on an H200 with 64 video prompts arriving together
# (benchmarks/reasoner.py, results/2026-12-02-h200-reasoner-scheduler-embed.log): 8192 gives 1,397 output tok/s,
# 2048 1,072 and V0's 512 604, at median inter-token latencies of 20, 26 and 48 ms (fewer, larger prefill passes
# let the decode steps run sooner).
PREFILL_CHUNK = 8192
# Vision patches encoded together in one step at most: sixteen 8-frame 448x448 videos (3,136 patches each). The
# tower's largest activation is then ~0.5 GiB (65,536 x 4,304 MLP channels in bf16), and a call of many videos costs
# a fraction of as many calls of one (benchmarks/vision_tower.py). A prompt with more patches is encoded alone.
ENCODE_PATCHES = 65536
# The most sequences decoded together (vLLM's `max_num_seqs`): the 64 concurrent requests on one H100. A
# CUDA graph is captured per power of two of rows up to it.
MAX_SLOTS = 64


@dataclass(eq=False)  # a job is itself: `in` and `remove` on queues compare identities, not prompts
class Job:
    """One sequence in the scheduler: its prompt, settings and row state. Its tokens go to `out` (a queue, or
    anything with `put`, called on the scheduler's thread during a step: it must be quick and must not raise) as
    `(index, Token)`, and `(index, END)` when it finishes (`row.finish_reason` says how; `error` if it failed).
    `prompt` is a `Prompt`, or a prompt still to embed (anything with `input_ids` and `patches`, which the
    scheduler's `encode` turns into a `Prompt`; jobs sharing one such object are embedded once)."""

    prompt: Prompt | Any
    params: Sampling
    row: Row
    out: queue.Queue | Any
    index: int = 0
    # Filled by the scheduler.
    slot: int = -1
    joined: bool = False  # its prompt is in the ring: it decodes
    generated: int = 0
    length: int = 0  # columns its sequence holds in the ring
    cache: KVCache | None = None  # its prompt's keys and values while it is prefilled in chunks

    def cancel(self) -> None:
        self.row.finish_reason = self.row.finish_reason or "stop"

    @property
    def error(self) -> BaseException | None:
        return self.row.error

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.input_ids)

    @property
    def prefilled(self) -> int:
        return self.cache.length if self.cache is not None else 0

    @property
    def embedded(self) -> bool:
        return isinstance(self.prompt, Prompt)


class Ring:
    """Keys and values of `rows` sequences, `[layers, rows, width, kv_heads, head_dim]`, and the columns each row
    attends to, `[rows, width]`."""

    def __init__(self, model: Cosmos3Transformer, rows: int, width: int):
        cfg, device = model.config, model.embed_tokens.weight.device
        shape = (cfg.num_hidden_layers, rows, width, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=model.dtype)
        self.v = torch.zeros(shape, device=device, dtype=model.dtype)
        self.mask = torch.zeros(rows, width, dtype=torch.bool, device=device)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def width(self) -> int:
        return self.k.shape[2]


class Rows:
    """The first `size` rows of a ring, as the cache `decode_step` writes: one token per row at column `at`."""

    def __init__(self, ring: Ring, size: int):
        self.k, self.v = ring.k[:, :size], ring.v[:, :size]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(1, at, k)
        self.v[layer].index_copy_(1, at, v)
        return self.k[layer], self.v[layer]


class Scheduler:
    """Decodes every submitted job in one running batch, on a thread of its own (`threaded`) or in the steps its
    callers run while they wait (`next`). `lock()` is held around each step (the server passes the worker's engine
    lock, so that video jobs interleave). `slots` (up to `MAX_SLOTS`) bounds the sequences decoded together; more
    wait. `prefill_chunk` is the prompt tokens prefilled per step while others decode. `columns` is the room a
    new cache leaves for decoding past its first prompt. `graph`: replay decode steps as CUDA graphs where
    possible (a GPU, no tensor parallelism, no layerwise offload). `encode` embeds a list of prompts still to embed
    (`Reasoner.embed_many`); without it every submitted prompt must be a `Prompt`. `after_step` is called after
    every step, outside `lock()`, once the step's tokens are in the jobs' `out`s: the server's hand-off of every
    stream's new text to the event loop in one call per step."""

    def __init__(
        self,
        model: Cosmos3Transformer,
        eos_token_ids: list[int],
        slots: int = 16,
        lock: Callable[[], AbstractContextManager] | None = None,
        columns: int = 256,
        threaded: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
        graph: bool = True,
        encode: Callable[[list[Any]], list[Prompt]] | None = None,
        after_step: Callable[[], None] | None = None,
    ):
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots={slots}: from 1 to {MAX_SLOTS}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: at least 1")
        self.model, self.eos, self.size, self.margin = model, set(eos_token_ids), slots, columns
        self.chunk = prefill_chunk
        self.encode = encode
        self.after_step = after_step
        self.lock = lock or nullcontext
        self.threaded = threaded  # False: callers run the steps (`next`, or `step()` in tests)
        self.waiting: queue.Queue[Job] = queue.Queue()  # submitted, not yet seen by a step
        self.queued: collections.deque[Job] = collections.deque()  # seen, waiting for a row
        self.jobs: list[Job | None] = [None] * slots  # the job holding each row (prefilling or decoding)
        self.ring: Ring | None = None
        self.column = 0  # the column every row writes next (the device keeps its own copy, `at`)
        self.use_graph = graph and graphable(model, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # per number of rows stepped
        self.pool = None  # the graphs' shared memory pool
        vocab = model.lm_head.weight.shape[0]
        device = self.device
        # The decode step's static inputs and output, refilled in place every step.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, slots, 1, dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(slots, vocab, device=device)
        self.sampler = Sampler(slots, vocab, device)
        self.drawn = torch.cuda.Event() if device.type == "cuda" else None  # the step's tokens reached the host
        self.wake = threading.Condition()
        self.stepping = threading.Lock()  # one step at a time (callers of `next` take turns)
        self.thread: threading.Thread | None = None
        self.closed = False
        self.steps = 0  # decode steps run
        self.most_active = 0  # the most jobs decoded together so far

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def submit(self, prompt: Prompt | Any, params: Sampling, row: Row, out: queue.Queue, index: int = 0) -> Job:
        if not isinstance(prompt, Prompt) and self.encode is None:
            raise TypeError(f"a {type(prompt).__name__} prompt needs a scheduler made with `encode`")
        job = Job(prompt, params, row, out, index)
        with self.wake:
            self.waiting.put(job)
            if self.threaded and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=self.loop, name="cosmos3-decode", daemon=True)
                self.thread.start()
            self.wake.notify()
        return job

    def next(self, out: queue.Queue) -> tuple[int, Token | object]:
        """The next item of a job's queue; without a thread of its own the scheduler steps until one arrives."""
        if self.threaded:
            return out.get()
        while True:
            try:
                return out.get_nowait()
            except queue.Empty:
                pass
            self.run_step()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()

    def release(self) -> None:
        """Free the cache and graphs while no job holds a row (the next job allocates them again)."""
        with self.stepping:
            if not self.active:
                self.ring, self.graphs, self.pool = None, {}, None

    @property
    def active(self) -> int:
        return sum(job is not None for job in self.jobs)

    @property
    def idle(self) -> bool:
        return not self.active and not self.queued and self.waiting.empty()

    # ------------------------------------------------------------------------------------------- the loop
    def loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and self.idle:
                    self.wake.wait()
                if self.closed:
                    return
            self.run_step()

    def run_step(self) -> None:
        try:
            with self.stepping, self.lock():
                self.step()
        except BaseException as exc:  # every job learns of it; the scheduler starts afresh
            self.fail(exc)
        if self.after_step is not None:
            try:
                self.after_step()
            except Exception:  # the hook's own failure must not stop the decode loop (it would hang every job)
                logger.exception("the scheduler's after_step hook failed")

    def fail(self, exc: BaseException) -> None:
        while not self.waiting.empty():
            self.queued.append(self.waiting.get())
        for job in [j for j in self.jobs if j is not None] + list(self.queued):
            self.retire(job, error=exc)
        self.queued.clear()
        self.ring, self.graphs, self.pool = None, {}, None

    @torch.inference_mode()
    def step(self) -> None:
        """Prefill within the budget, sample one token per decoding job, launch the next decode step, then hand
        the tokens out and retire finished jobs."""
        while not self.waiting.empty():
            self.queued.append(self.waiting.get())
        for job in [j for j in self.jobs if j is not None] + list(self.queued):
            if job.row.done:  # cancelled or stopped by its consumer
                self.retire(job)
        self.embed_queued()
        self.admit()
        live = [j for j in self.jobs if j is not None and j.joined]
        self.most_active = max(self.most_active, len(live))
        if not live:
            return
        size = self.bucket(max(j.slot for j in live) + 1)
        draw = self.sampler(self.logits[:size], [j.slot for j in live])
        going = [j for j in live if j.generated + 1 < j.params.max_tokens]  # the others end with this token
        if going:
            self.tokens[:size].copy_(draw.ids)
            host = draw.to("cpu", non_blocking=True)
            if self.drawn is not None:
                self.drawn.record()
            self.decode(size, live)
            if self.drawn is not None:
                self.drawn.synchronize()  # the tokens, not the decode step launched after them
        else:
            host = draw.to("cpu")
        for job, token in zip(live, self.sampler.tokens(host, [j.slot for j in live]), strict=True):
            self.hand_out(job, token)

    def hand_out(self, job: Job, token: Token) -> None:
        job.generated += 1
        matcher = job.row.matcher
        if matcher is not None and not matcher.is_error() and token.id not in self.eos:
            matcher.consume_token(token.id)  # a token it refuses puts it in its error state
        if matcher is not None and matcher.is_error():
            # The grammar failed (llguidance's lexer or parser limits: a regex or const too large to step through):
            # it refused the token it allowed, or its failed mask allowed only end of turn. The request's error,
            # not a reply cut short that claims to match its schema.
            self.retire(job, error=grammar_error(job.params.response_format, matcher))
            return
        if token.id in self.eos:
            job.row.finish_reason = "stop"
            self.retire(job)
            return
        if matcher is not None and matcher.is_stopped():  # the grammar is complete: nothing may follow
            job.row.finish_reason = "stop"
        job.out.put((job.index, token))
        if job.generated >= job.params.max_tokens and not job.row.done:
            job.row.finish_reason = "length"
        if job.row.done:
            self.retire(job)

    def retire(self, job: Job, error: BaseException | None = None) -> None:
        if error is not None:
            job.row.error = error
        job.row.finish_reason = job.row.finish_reason or "stop"
        if job.slot >= 0 and self.jobs[job.slot] is job:
            self.jobs[job.slot] = None
        elif job in self.queued:
            self.queued.remove(job)
        job.cache = None
        job.out.put((job.index, END))

    # ------------------------------------------------------------------------------------------- prefill
    def embed_queued(self) -> None:
        """Embed the queued prompts that free rows are waiting for, first come first served, in one call of
        `encode` (up to `ENCODE_PATCHES` vision patches; the first always goes). If the call fails, each prompt is
        embedded alone, so that one bad prompt fails only its own jobs."""
        head = list(itertools.islice(self.queued, self.jobs.count(None)))
        sources: dict[int, Any] = {}
        patches = 0
        for job in head:
            if job.embedded or id(job.prompt) in sources:
                continue
            patches += getattr(job.prompt, "patches", 0)
            if sources and patches > ENCODE_PATCHES:
                break
            sources[id(job.prompt)] = job.prompt
        if not sources:
            return
        try:
            prompts = dict(zip(sources, self.encode(list(sources.values())), strict=True))
        except Exception:
            prompts = {}
            for key, source in sources.items():
                try:
                    prompts[key] = self.encode([source])[0]
                except Exception as exc:  # this prompt's jobs fail; the others go on
                    for job in [j for j in self.queued if id(j.prompt) == key]:
                        self.retire(job, error=exc)
        for job in self.queued:
            if not job.embedded and id(job.prompt) in prompts:
                job.prompt = prompts[id(job.prompt)]

    def admit(self) -> None:
        """Prefill waiting jobs, first come first served, `prefill_chunk` tokens per step while others decode
        (with no one decoding, the first prompt goes whole). Whole prompts that fit the budget are prefilled in
        one padded batch; a longer one in chunks, one per step."""
        budget = self.chunk
        while budget > 0:
            job = next((j for j in self.jobs if j is not None and not j.joined), None)  # part-way through
            if job is None and self.queued and self.ready_to_take(self.queued[0]):
                job = self.take(self.queued.popleft())
            if job is None:
                return
            left = job.prompt_len - job.prefilled
            if not any(j is not None and j.joined for j in self.jobs):
                budget = max(budget, left)  # nobody to stall
            if job.prefilled == 0 and left <= budget:
                group = [job]
                budget -= left
                while self.queued and self.ready_to_take(self.queued[0]) and self.queued[0].prompt_len <= budget:
                    budget -= self.queued[0].prompt_len
                    group.append(self.take(self.queued.popleft()))
                self.prefill_whole(group)
            else:
                step = min(left, budget)
                budget -= step
                self.prefill_part(job, step)

    def ready_to_take(self, job: Job) -> bool:
        """A queued job can take a row: one is free and its prompt is embedded."""
        return job.embedded and None in self.jobs

    def take(self, job: Job) -> Job:
        """Give a queued job the lowest free row (low rows keep the stepped batch small)."""
        job.slot = self.jobs.index(None)
        self.jobs[job.slot] = job
        return job

    def prefill_whole(self, group: list[Job]) -> None:
        model = self.model
        try:
            batch = Batch.of([j.prompt for j in group])
            width = batch.valid.shape[1]
            cache = KVCache(model.config, len(group), width, self.device, model.dtype)
            cos, sin = model.rope(batch.positions)
            mask = batch.attention_mask()
            hidden = model.causal_forward(batch.embeds, cos, sin, cache, attn_mask=mask, deepstack=batch.deepstack)
            logits = model.lm_head(hidden[:, -1]).float()
        except Exception as exc:  # these jobs fail; the others go on
            for job in group:
                self.retire(job, error=exc)
            return
        for b, job in enumerate(group):  # left-padded: each prompt ends in the last column
            start = width - job.prompt_len
            self.join(job, cache.k[:, b, start:], cache.v[:, b, start:], logits[b])

    def prefill_part(self, job: Job, tokens: int) -> None:
        model = self.model
        try:
            if job.cache is None:
                job.cache = KVCache(model.config, 1, job.prompt_len, self.device, model.dtype)
            end = job.prefilled + tokens
            hidden = prefill(model, job.prompt, job.cache, end)
            if end < job.prompt_len:
                return
            logits = model.lm_head(hidden[0, -1]).float()
        except Exception as exc:
            self.retire(job, error=exc)
            return
        self.join(job, job.cache.k[:, 0], job.cache.v[:, 0], logits)

    def join(self, job: Job, k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor) -> None:
        """Copy a prefilled prompt's keys and values `[layers, L, ...]` into its row, on the arc that ends at the
        write column, and make its first token's logits the row's."""
        length, slot = job.prompt_len, job.slot
        alone = not any(j is not None and j.joined for j in self.jobs)
        if alone and self.ring is not None and self.ring.width > 2 * (length + 1 + self.margin):
            # A ring grown for an earlier, longer sequence: every step attends over all its columns, so start anew.
            self.ring, self.graphs, self.pool = None, {}, None
        self.reserve(slot + 1, length + 1)
        if alone:
            # Its keys from column 0 in order, as a cache of its own holds them, so that a lone request attends in
            # the same order (the same rounding in bf16) as the static path and transformers.
            self.column = length
            self.at.fill_(length)
        columns = torch.arange(self.column - length, self.column, device=self.device) % self.ring.width
        self.ring.k[:, slot].index_copy_(1, columns, k)
        self.ring.v[:, slot].index_copy_(1, columns, v)
        self.ring.mask[slot] = False
        self.ring.mask[slot].index_fill_(0, columns, True)
        self.positions[:, slot] = job.prompt.next_position
        self.logits[slot] = logits
        self.sampler.start(slot, job.params, job.row, job.prompt.input_ids)
        job.joined, job.length, job.cache = True, length, None

    # ------------------------------------------------------------------------------------------- decoding
    def bucket(self, rows: int) -> int:
        """The rows a step runs over: the smallest power of two holding `rows`, within the ring."""
        return min(1 << (rows - 1).bit_length(), self.ring.rows)

    def decode(self, size: int, live: list[Job]) -> None:
        """One decode step over the first `size` rows: eagerly, or replaying this size's CUDA graph (captured
        after its first eager step, which is also the warm-up capture needs)."""
        self.reserve(size, max(j.length for j in live) + 1)
        if not self.use_graph:
            self.run(size)
        elif size in self.graphs:
            self.graphs[size].replay()
        else:
            self.run(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.run(size)  # recorded, not run
            self.pool = self.pool if self.pool is not None else graph.pool()
            self.graphs[size] = graph
        self.column = (self.column + 1) % self.ring.width
        for job in live:
            job.length += 1
        self.steps += 1

    def run(self, size: int) -> None:
        """The step itself, every input and output a fixed buffer: write column `at` for every row, advance it."""
        ring = self.ring
        mask = ring.mask[:size]
        mask.index_fill_(1, self.at, True)  # this token's column; free rows thus never softmax over nothing
        logits = self.model.decode_step(self.tokens[:size], self.positions[:, :size], Rows(ring, size), self.at, mask)
        self.logits[:size].copy_(logits)
        self.positions[:, :size] += 1
        self.at.add_(1).remainder_(ring.width)

    # ------------------------------------------------------------------------------------------- the cache
    def reserve(self, rows: int, columns: int) -> None:
        """Make the ring at least `rows` rows and `columns` wide (doubling, so that reallocations are rare)."""
        if self.ring is None:
            self.ring = Ring(self.model, min(self.size, 1 << (rows - 1).bit_length()), columns + self.margin)
            self.column = 0
            self.at.zero_()
            return
        ring = self.ring
        if rows <= ring.rows and columns <= ring.width:
            return
        new_rows = ring.rows if rows <= ring.rows else min(self.size, max(2 * ring.rows, rows))
        width = ring.width if columns <= ring.width else max(2 * ring.width, columns + self.margin)
        self.resize(new_rows, width)

    def resize(self, rows: int, width: int) -> None:
        """A new ring holding the old one's columns in order, oldest first, so that every arc ends at column
        `old width` (the new write column). The graphs captured on the old buffers go with them."""
        old, cut = self.ring, self.column
        self.ring = new = Ring(self.model, rows, width)
        head = old.width - cut
        for src, dst in ((old.k, new.k), (old.v, new.v)):
            dst[:, : old.rows, :head] = src[:, :, cut:]
            dst[:, : old.rows, head : old.width] = src[:, :, :cut]
        new.mask[: old.rows, :head] = old.mask[:, cut:]
        new.mask[: old.rows, head : old.width] = old.mask[:, :cut]
        self.column = old.width % width
        self.at.fill_(self.column)
        self.graphs, self.pool = {}, None
