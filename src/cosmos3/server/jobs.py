"""Generation jobs: a SQLite record per job, a bounded queue, and one worker thread that owns the engine.

queued -> in_progress -> completed | failed, or -> cancelling -> cancelled. The worker is the only caller of
`engine.generate_batch`; everything else talks to it through `submit_many`, `cancel` and `when_done`, so no route
ever holds the engine (or waits for it) on the event loop. Conversations take the engine for short units of work
(`Worker.exclusive`); a running batch lends it to them between transformer layers (`cosmos3.turns`)."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosmos3.errors import Cancelled, RequestError
from cosmos3.generation.request import GenerateRequest
from cosmos3.parallel.offload import OffloadedLayers
from cosmos3.server.errors import QueueFull, ShuttingDown
from cosmos3.turns import EngineTurns

logger = logging.getLogger(__name__)

FINAL = ("completed", "failed", "cancelled")
ACTIVE = ("queued", "in_progress", "cancelling")
RESTARTED = "interrupted by a server restart; submit it again"
SHUT_DOWN = "interrupted by a server shutdown; submit it again"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    dialect TEXT NOT NULL,
    request TEXT NOT NULL,
    info TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    completed_at REAL,
    outputs TEXT,
    result TEXT,
    error TEXT
)
"""


@dataclass
class Job:
    id: str
    dialect: str
    request: dict[str, Any]  # resolved GenerateRequest fields (media as files under the job's folder)
    info: dict[str, Any]  # what the dialect echoes back (prompt, size, seconds, ...)
    status: str = "queued"
    progress: int = 0
    created_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    outputs: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


class JobStore:
    """Jobs in SQLite, so that a restart loses no finished job."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        row = (job.id, job.dialect, json.dumps(job.request), json.dumps(job.info), job.status, job.progress)
        row += (job.created_at, job.completed_at, json.dumps(job.outputs), json.dumps(job.result))
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?)", (*row, json.dumps(job.error)))

    def update(self, job_id: str, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set fields; with `only_if`, only while the job's status is one of those. True if a row changed."""
        encoded = {k: json.dumps(v) if k in ("outputs", "result", "error") else v for k, v in fields.items()}
        query = f"UPDATE jobs SET {', '.join(f'{k}=?' for k in encoded)} WHERE id=?"
        args: list[Any] = [*encoded.values(), job_id]
        if only_if:
            query += f" AND status IN ({','.join('?' * len(only_if))})"
            args += list(only_if)
        with self._lock:
            return self._db.execute(query, args).rowcount > 0

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list(self, dialect: str | None = None, status: tuple[str, ...] | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if dialect:
            query, args = query + " AND dialect=?", [*args, dialect]
        if status:
            query += f" AND status IN ({','.join('?' * len(status))})"
            args += list(status)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, rowid", args).fetchall()
        return [self._job(r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    @staticmethod
    def _job(row) -> Job:
        return Job(
            id=row[0],
            dialect=row[1],
            request=json.loads(row[2]),
            info=json.loads(row[3]),
            status=row[4],
            progress=row[5],
            created_at=row[6],
            completed_at=row[7],
            outputs=json.loads(row[8] or "[]"),
            result=json.loads(row[9] or "{}"),
            error=json.loads(row[10] or "null"),
        )


class Worker:
    """Runs queued jobs on the engine, one batch at a time; a cancel stops a running job at its next step."""

    def __init__(
        self,
        engine,
        store: JobStore,
        outputs_dir: Path,
        max_queue: int,
        retention_s: float,
        max_batch: int = 1,
        scrub: Callable[[str], str] = str,
    ):
        self.engine, self.store, self.outputs_dir = engine, store, outputs_dir
        self.max_queue, self.retention_s, self.max_batch, self.scrub = max_queue, retention_s, max_batch, scrub
        # The worker's batches (long holds) and the Reasoner's units of work (short holds) take turns on the engine.
        self.turns = EngineTurns(synchronize=device_synchronize(engine))
        self._cond = threading.Condition(threading.RLock())
        self._queue: deque[str] = deque()
        self._running: set[str] = set()
        self._cancel: set[str] = set()
        self._callbacks: dict[str, list[Callable[[], None]]] = {}  # per active job: called once it is final
        self._paused = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def engine_lock(self) -> EngineTurns:
        """The turns under the name of the lock they replace (`locked()`: a conversation holds the engine now)."""
        return self.turns

    @property
    def waiting_for_engine(self) -> int:
        """Conversation units waiting for the engine (tests wait for a conversation to queue up)."""
        return self.turns.waiting

    # ------------------------------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Recover the store (README: interrupted jobs fail, queued ones run) and start the threads. Idempotent;
        a stopped worker can start again (test clients cycle the app's lifespan)."""
        if any(t.is_alive() for t in self._threads):
            if not self._stop.is_set():
                return
            for t in self._threads:  # stopped, but a step outlived the grace period: let it end first
                t.join(timeout=30)
        self._stop.clear()
        with self._cond:
            self._cancel.clear()
            for job in self.store.list(status=("in_progress", "cancelling")):
                if job.id in self._running:
                    continue  # still finishing a step after an earlier stop; it ends as that stop said
                status = "cancelled" if job.status == "cancelling" else "failed"
                error = None if status == "cancelled" else {"code": 500, "message": RESTARTED}
                self.store.update(job.id, status=status, completed_at=time.time(), error=error)
            for job in self.store.list(status=("queued",)):
                self._callbacks.setdefault(job.id, [])
                if job.id not in self._queue:
                    self._queue.append(job.id)  # in creation order; may exceed max_queue briefly
        self._threads = [
            threading.Thread(target=self._run, daemon=True, name="cosmos3-worker"),
            threading.Thread(target=self._sweep, daemon=True, name="cosmos3-retention"),
        ]
        for t in self._threads:
            t.start()

    def begin_shutdown(self) -> None:
        """Take no more jobs and stop the running one at its next step. Safe in a signal handler (no locks)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop; wait up to `grace_s` for the running step, then mark what still runs failed ("interrupted by a
        server shutdown"), so that a step that takes minutes does not hold the process. Queued jobs stay queued
        and run after a restart."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + grace_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._cond:
            running = list(self._running)
        for job_id in running:
            self._finish(job_id, status="failed", error={"code": 500, "message": SHUT_DOWN})

    def pause(self) -> None:
        """Finish the running batch but take no next job until `resume()` (tests use it to keep jobs queued)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------ jobs
    def job_dir(self, job_id: str) -> Path:
        return self.outputs_dir / job_id

    def submit(self, dialect: str, request: dict[str, Any], info: dict[str, Any], job_id: str | None = None) -> Job:
        return self.submit_many([(dialect, request, info, job_id)])[0]

    def submit_many(self, items: list[tuple[str, dict, dict, str | None]]) -> list[Job]:
        """Queue all of them or none (QueueFull when the queue has fewer free places than jobs)."""
        jobs = [Job(id=job_id or new_id(), dialect=d, request=r, info=i) for d, r, i, job_id in items]
        with self._cond:
            if self._stop.is_set():
                raise ShuttingDown()
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull()
            for job in jobs:
                self.store.add(job)
                self._callbacks[job.id] = []
                self._queue.append(job.id)
            self._cond.notify_all()
        return jobs

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one at once ("cancelled"), a running one at its next step ("cancelling").
        Returns the job's status afterwards, or None for an unknown job."""
        with self._cond:
            job = self.store.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                if job_id in self._queue:
                    self._queue.remove(job_id)
                self._finish(job_id, status="cancelled")
                return "cancelled"
            if job.status in ("in_progress", "cancelling"):
                self._cancel.add(job_id)
                self.store.update(job_id, only_if=("in_progress",), status="cancelling")
                return "cancelling"
            return job.status

    def when_done(self, job_id: str, callback: Callable[[], None]) -> bool:
        """Call `callback()` (on the worker's thread) once the job is final. False, and no call, when the job is
        already final or unknown."""
        with self._cond:
            if job_id not in self._callbacks:
                return False
            self._callbacks[job_id].append(callback)
            return True

    def forget(self, job_id: str, callback: Callable[[], None]) -> None:
        with self._cond:
            callbacks = self._callbacks.get(job_id, [])
            if callback in callbacks:
                callbacks.remove(callback)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is final (None on timeout); for scripts and tests, never on the event loop."""
        done = threading.Event()
        if self.when_done(job_id, done.set) and not done.wait(timeout):
            return None
        return self.store.get(job_id)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the engine for one short unit of a conversation (its prompt's encoding, a decode step, an
        admission). While a batch runs this waits about one transformer layer in a single-process layout (the batch
        lends the engine between layers), the rest of the batch otherwise (`interleavable`). Call it in a thread."""
        with self.turns.short():
            yield

    # ------------------------------------------------------------------------------------------ the thread
    def _finish(self, job_id: str, **fields: Any) -> None:
        """Make a job final (unless it already is) and call its waiters."""
        if fields.get("error"):
            fields["error"] = {**fields["error"], "message": self.scrub(fields["error"]["message"])}
        with self._cond:
            self.store.update(job_id, only_if=ACTIVE, completed_at=time.time(), **fields)
            callbacks = self._callbacks.pop(job_id, [])
            self._cancel.discard(job_id)
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter that went away
                logger.debug("job %s: a waiter's callback failed", job_id, exc_info=True)

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._stop.is_set() and (self._paused or not self._queue):
                self._cond.wait(0.5)
            if self._stop.is_set():
                return []
            job = self.store.get(self._queue.popleft())
            if job is None or job.status != "queued":
                return []
            batch = [job]
            try:
                key = self.engine.batch_key(GenerateRequest.from_dict(job.request)) if self.max_batch > 1 else None
                if key is not None:
                    batch += self._take_compatible(key)
            except Exception:  # a stored request that no longer parses runs alone (and fails with its error)
                logger.exception("job %s: cannot compute its batch key", job.id)
            for j in batch:
                self.store.update(j.id, status="in_progress", progress=0)
                self._running.add(j.id)
            return batch

    def _take_compatible(self, key: tuple) -> list[Job]:
        """Up to max_batch - 1 more queued jobs that can share denoising passes with the one in hand."""
        taken: list[Job] = []
        for job_id in list(self._queue):
            if len(taken) >= self.max_batch - 1:
                break
            other = self.store.get(job_id)
            if other is not None and other.status == "queued":
                if self.engine.batch_key(GenerateRequest.from_dict(other.request)) == key:
                    self._queue.remove(job_id)
                    taken.append(other)
        return taken

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                try:
                    self._run_batch(batch)
                finally:
                    with self._cond:
                        self._running.difference_update(j.id for j in batch)

    def _on_step(self, job_id: str) -> Callable[[int, int], None]:
        last = [0]

        def on_step(i: int, n: int) -> None:
            if self._stop.is_set() or job_id in self._cancel:
                raise Cancelled(job_id)
            progress = min(99, int(100 * i / n))
            if progress != last[0]:
                last[0] = progress
                self.store.update(job_id, progress=progress)

        return on_step

    def _run_batch(self, batch: list[Job]) -> None:
        """One job, or queued jobs of one shape and schedule denoised together; each keeps its own outcome."""
        requests: list[GenerateRequest] = []
        try:
            requests = [GenerateRequest.from_dict(job.request) for job in batch]
            with self.turns.long(), yield_points(self.engine, self.turns.yield_point):
                outcomes = self.engine.generate_batch(requests, [self._on_step(job.id) for job in batch])
        except Exception as exc:  # a failing batch must not take the server down
            logger.exception("jobs %s failed", [job.id for job in batch])
            outcomes = [exc] * len(batch)
        for job, outcome in zip(batch, outcomes, strict=True):
            try:
                if isinstance(outcome, Cancelled):
                    if job.id in self._cancel or not self._stop.is_set():
                        self._finish(job.id, status="cancelled")
                    else:
                        self._finish(job.id, status="failed", error={"code": 500, "message": SHUT_DOWN})
                elif isinstance(outcome, RequestError):
                    error = {"code": 400, "message": str(outcome), "param": outcome.field}
                    self._finish(job.id, status="failed", error=error)
                elif isinstance(outcome, Exception):
                    error = {"code": 500, "message": f"{type(outcome).__name__}: {outcome}"}
                    self._finish(job.id, status="failed", error=error)
                else:
                    outputs, summary = self._save(job, outcome)
                    self._finish(job.id, status="completed", progress=100, outputs=outputs, result=summary)
            except Exception as exc:  # saving one job's files failed; the others are unaffected
                logger.exception("job %s failed", job.id)
                self._finish(job.id, status="failed", error={"code": 500, "message": f"{type(exc).__name__}: {exc}"})

    def _save(self, job: Job, result) -> tuple[list[str], dict[str, Any]]:
        folder = self.job_dir(job.id)
        ext = job.info.get("image_format") or ("jpg" if result.video.shape[0] == 1 else "mp4")
        paths = result.save(folder / f"vision.{ext}")
        summary: dict[str, Any] = {
            "num_frames": int(result.video.shape[0]),
            "fps": result.fps,
            "height": int(result.video.shape[1]),
            "width": int(result.video.shape[2]),
            "seed": job.request.get("seed"),
            "has_sound": result.sound is not None,
        }
        if result.action is not None:
            summary["action"] = result.action.tolist()
            summary["action_meta"] = result.metadata.get("action", {})
        return [str(p) for p in paths], summary

    def _sweep(self) -> None:
        """Remove finished jobs (record and files) once they are older than the retention period."""
        while not self._stop.wait(min(60.0, max(0.2, self.retention_s / 4))):
            cutoff = time.time() - self.retention_s
            for job in self.store.list(status=FINAL):
                if job.completed_at is not None and job.completed_at < cutoff:
                    shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
                    self.store.delete(job.id)


def device_synchronize(engine) -> Callable[[], None] | None:
    """What the worker runs before it lends the engine: on CUDA, wait for the kernels it has queued (the CPU runs
    layers ahead of the GPU; a conversation's kernels would otherwise start only after those). None on the CPU."""
    device = torch.device(getattr(engine, "device", "cpu"))
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.current_stream(device).synchronize()


def interleavable(engine) -> bool:
    """Whether a batch may lend the engine between layers: one process, the layers resident on the device. In a
    parallel layout the other ranks replay rank 0's calls in order, so a conversation slipped between two layers
    would be missing from theirs; layerwise offload streams the layers in the order a pass reads them (prefetched
    on a side stream). Both keep today's turn for the whole batch."""
    transformer = getattr(engine, "transformer", None)
    groups = getattr(engine, "groups", None)
    if transformer is None or (groups is not None and groups.distributed):
        return False
    return not isinstance(transformer.layers, OffloadedLayers)


def video_codec(engine):
    generator = getattr(engine, "generator", None)
    return generator.parts.video if generator is not None else None


def vae_blocks(engine) -> list[torch.nn.Module]:
    """The VAE's encoder and decoder, called once per latent frame (or tile; the chunked decode calls neither and
    yields after each chunk instead): a 720p decode takes seconds."""
    vae = getattr(video_codec(engine), "vae", None)
    return [m for m in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)) if isinstance(m, torch.nn.Module)]


@contextmanager
def yield_points(engine, yield_point: Callable[[], None]) -> Iterator[bool]:
    """For one batch: `yield_point()` after every transformer layer (prompt caches and denoising passes), every VAE
    encoder / decoder call and every decoded chunk, where the engine allows it (`interleavable`); yields whether it
    does. The calls change no number of the batch: a conversation runs only while the batch waits."""
    if not interleavable(engine):
        yield False
        return
    transformer = engine.transformer
    transformer.between_layers = yield_point
    handles = [block.register_forward_hook(lambda *_: yield_point()) for block in vae_blocks(engine)]
    codec = video_codec(engine)
    if codec is not None:
        codec.between_chunks = yield_point
    try:
        yield True
    finally:
        transformer.between_layers = None
        if codec is not None:
            codec.between_chunks = None
        for handle in handles:
            handle.remove()


def new_id(prefix: str = "video_gen") -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
