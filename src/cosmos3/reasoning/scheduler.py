"""Continuous batching for the Reasoner: one decode loop that requests join and leave at any step.

The batch is a KV cache of `slots` rows that all write one shared column per step (the static-shape
`Cosmos3Transformer.decode_step`); a per-row mask says which columns each row attends to. A request joins by being
prefilled alone and having its keys and values copied into a free row, right-aligned to the current column, so
that from its first decode step on it sees exactly what it would see decoding alone (keys carry their own rotary
positions, so the column they sit in does not matter). A finished, cancelled or stopped request gives its row back
at once. When the columns run out the cache is compacted (columns no live row uses are dropped) or grown.

Each request samples with its own settings, generator and grammar (`Sampler` over its own row), so its tokens do
not depend on the requests it shares the batch with: its greedy tokens equal running it alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from cosmos3.model.transformer import Cosmos3Transformer, KVCache
from cosmos3.reasoning.decoding import Prompt, Row, Sampler, Sampling

END = object()  # the last item of a request's queue


@dataclass
class Job:
    """One sequence in the scheduler: its prompt, settings and row state. Its tokens go to `out` as
    `(index, Token)`, and `(index, END)` when it finishes (`row.finish_reason` says how; `error` if it failed)."""

    prompt: Prompt
    params: Sampling
    row: Row
    out: queue.Queue
    index: int = 0
    error: BaseException | None = None
    # Filled by the scheduler.
    slot: int = -1
    generated: int = 0
    last: int = 0
    logits: torch.Tensor | None = None
    sampler: Sampler | None = None

    def cancel(self) -> None:
        self.row.finish_reason = self.row.finish_reason or "stop"


class Scheduler:
    """Decodes every submitted job in one running batch on a thread of its own. `lock()` is held around each
    step and each admission (the server passes the worker's engine lock, so that video jobs interleave)."""

    def __init__(
        self,
        model: Cosmos3Transformer,
        eos_token_ids: list[int],
        slots: int = 16,
        lock: Callable[[], AbstractContextManager] | None = None,
        columns: int = 256,
        threaded: bool = True,
    ):
        self.model, self.eos, self.size, self.margin = model, set(eos_token_ids), slots, columns
        self.lock = lock or nullcontext
        self.threaded = threaded  # False: the caller runs `step()` itself (tests)
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.jobs: list[Job | None] = [None] * slots
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # [slots, columns] which columns each row attends to
        self.start = [0] * slots  # first column of each row's sequence
        self.column = 0  # the next column every row writes
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.steps = 0  # decode steps run
        self.most_active = 0  # the most jobs decoded together so far

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def submit(self, prompt: Prompt, params: Sampling, row: Row, out: queue.Queue, index: int = 0) -> Job:
        job = Job(prompt, params, row, out, index)
        with self.wake:
            self.waiting.put(job)
            if self.threaded and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=self.loop, name="cosmos3-decode", daemon=True)
                self.thread.start()
            self.wake.notify()
        return job

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()

    @property
    def active(self) -> int:
        return sum(job is not None for job in self.jobs)

    # ------------------------------------------------------------------------------------------- the loop
    def loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.active and self.waiting.empty():
                    self.wake.wait()
                if self.closed:
                    return
            try:
                with self.lock():
                    self.step()
            except BaseException as exc:  # every job of the batch learns of it; the scheduler starts afresh
                for job in [j for j in self.jobs if j is not None]:
                    self.retire(job, error=exc)
                self.cache = None

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting jobs into free rows, sample one token per job, retire finished ones, decode a step."""
        while not self.waiting.empty() and None in self.jobs:
            self.admit(self.waiting.get())
        for job in [j for j in self.jobs if j is not None]:
            if job.row.done:  # cancelled or stopped by its consumer
                self.retire(job)
                continue
            (token,) = job.sampler(job.logits)
            job.generated += 1
            if token.id in self.eos:
                job.row.finish_reason = "stop"
                self.retire(job)
                continue
            if job.row.matcher is not None:
                job.row.matcher.consume_token(token.id)
                if job.row.matcher.is_stopped():
                    job.row.finish_reason = "stop"
            job.last = token.id
            job.out.put((job.index, token))
            if job.generated >= job.params.max_tokens and not job.row.done:
                job.row.finish_reason = "length"
            if job.row.done:
                self.retire(job)
        live = [j for j in self.jobs if j is not None]
        self.most_active = max(self.most_active, len(live))
        if not live:
            return
        self.reserve(1)
        tokens = torch.zeros(self.size, dtype=torch.long, device=self.device)
        positions = torch.zeros(3, self.size, 1, dtype=torch.long, device=self.device)
        for job in live:
            tokens[job.slot] = job.last
            positions[:, job.slot] = job.prompt.next_position + job.generated - 1
        self.mask[:, self.column] = True  # free rows attend to this column only: no empty softmax row
        at = torch.tensor([self.column], device=self.device)
        logits = self.model.decode_step(tokens, positions, self.cache, at, self.mask)
        self.column += 1
        for job in live:
            job.logits = logits[job.slot : job.slot + 1]
        self.steps += 1

    def admit(self, job: Job) -> None:
        """Prefill the job alone and copy its keys and values into a free row, ending at the current column."""
        model, prompt = self.model, job.prompt
        length = len(prompt.input_ids)
        try:
            cache = KVCache(model.config, 1, length, self.device, model.dtype)
            cos, sin = model.rope(prompt.positions[:, None])
            deepstack = (prompt.visual_mask[None], prompt.deepstack) if prompt.deepstack else None
            hidden = model.causal_forward(prompt.embeds[None], cos, sin, cache, deepstack=deepstack)
            job.logits = model.lm_head(hidden[:, -1]).float()
            job.sampler = Sampler(job.params, [job.row], [prompt.input_ids], job.logits.shape[-1], self.device)
        except BaseException as exc:
            job.error = exc
            job.out.put((job.index, END))
            return
        if self.cache is None:
            self.allocate(length + self.margin)
            self.column = length
        if self.column < length:  # room on the left for the prompt
            self.resize(self.cache.k.shape[2] + length - self.column, shift=length - self.column)
        slot = self.jobs.index(None)
        self.cache.k[:, slot, self.column - length : self.column] = cache.k[:, 0]
        self.cache.v[:, slot, self.column - length : self.column] = cache.v[:, 0]
        self.mask[slot] = False
        self.mask[slot, self.column - length : self.column] = True
        self.start[slot] = self.column - length
        job.slot, self.jobs[slot] = slot, job

    def retire(self, job: Job, error: BaseException | None = None) -> None:
        if error is not None:
            job.error = error
        job.row.finish_reason = job.row.finish_reason or "stop"
        if job.slot >= 0 and self.jobs[job.slot] is job:
            self.jobs[job.slot] = None
            self.mask[job.slot] = False
        job.out.put((job.index, END))

    # ------------------------------------------------------------------------------------------- the cache
    def allocate(self, columns: int) -> None:
        self.cache = KVCache(self.model.config, self.size, columns, self.device, self.model.dtype)
        self.mask = torch.zeros(self.size, columns, dtype=torch.bool, device=self.device)

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more writes: drop the columns no live row uses, else grow."""
        width = self.cache.k.shape[2]
        if self.column + columns <= width:
            return
        live = [self.start[j.slot] for j in self.jobs if j is not None]
        drop = min(live) if live else self.column
        if drop > 0:
            self.resize(width, shift=-drop)
        if self.column + columns > self.cache.k.shape[2]:
            self.resize(2 * self.cache.k.shape[2])

    def resize(self, columns: int, shift: int = 0) -> None:
        """A cache of `columns` columns holding the old one moved right by `shift` (left when negative)."""
        old_k, old_v, old_mask = self.cache.k, self.cache.v, self.mask
        self.allocate(columns)
        width = old_k.shape[2]
        src = slice(max(0, -shift), min(width, columns - shift))
        dst = slice(src.start + shift, src.stop + shift)
        self.cache.k[:, :, dst] = old_k[:, :, src]
        self.cache.v[:, :, dst] = old_v[:, :, src]
        self.mask[:, dst] = old_mask[:, src]
        self.column += shift
        self.start = [s + shift for s in self.start]
