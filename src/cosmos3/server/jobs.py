"""Generation jobs: a SQLite record per job, a bounded queue, and one worker thread that owns the GPU."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosmos3.errors import Cancelled, RequestError
from cosmos3.generation.request import GenerateRequest

logger = logging.getLogger(__name__)

# queued -> in_progress -> completed | failed | cancelled
FINAL = ("completed", "failed", "cancelled")

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
    request: dict[str, Any]  # GenerateRequest fields (media as files under the job's folder)
    info: dict[str, Any]  # what the dialect echoes back (model, prompt, size, ...)
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
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    job.dialect,
                    json.dumps(job.request),
                    json.dumps(job.info),
                    job.status,
                    job.progress,
                    job.created_at,
                    job.completed_at,
                    json.dumps(job.outputs),
                    json.dumps(job.result),
                    json.dumps(job.error),
                ),
            )

    def update(self, job_id: str, **fields: Any) -> None:
        encoded = {k: json.dumps(v) if k in ("outputs", "result", "error") else v for k, v in fields.items()}
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {', '.join(f'{k}=?' for k in encoded)} WHERE id=?", (*encoded.values(), job_id)
            )

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
            rows = self._db.execute(query + " ORDER BY created_at", args).fetchall()
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


class QueueFull(Exception):
    pass


class Worker:
    """Runs queued jobs one at a time on the engine; a cancel stops a running job at its next denoising step."""

    def __init__(
        self, engine, store: JobStore, outputs_dir: Path, max_queue: int, retention_s: float, max_batch: int = 1
    ):
        self.engine = engine
        self.max_batch = max_batch
        self.store = store
        self.outputs_dir = outputs_dir
        self.retention_s = retention_s
        self.queue: queue.Queue[str] = queue.Queue(maxsize=max_queue)
        self.engine_lock = threading.Lock()  # the Reasoner's chat requests share the engine with the worker
        self._cancel: set[str] = set()
        self._done: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Recover the store (see README: interrupted jobs fail, queued ones run) and start the threads.
        Idempotent, and a stopped worker can start again (ASGI test clients cycle the app's lifespan)."""
        if any(t.is_alive() for t in self._threads):
            return
        self._stop.clear()
        self._cancel.clear()
        for job in self.store.list(status=("in_progress",)):
            self.store.update(
                job.id,
                status="failed",
                completed_at=time.time(),
                error={"code": 500, "message": "interrupted by a server restart; submit it again"},
            )
        for job in self.store.list(status=("queued",)):
            self._done[job.id] = threading.Event()
            if job.id not in self.queue.queue:
                self.queue.put(job.id)  # re-queued in creation order; may exceed max_queue briefly
        self._threads = [
            threading.Thread(target=self._run, daemon=True, name="cosmos3-worker"),
            threading.Thread(target=self._sweep, daemon=True, name="cosmos3-retention"),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop taking jobs; a running job finishes its current step first (its record stays in_progress and is
        marked failed at the next start if it did not complete)."""
        self._stop.set()
        running = self.store.list(status=("in_progress",))
        self._cancel.update(j.id for j in running)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=30)

    def job_dir(self, job_id: str) -> Path:
        return self.outputs_dir / job_id

    def submit(self, dialect: str, request: dict[str, Any], info: dict[str, Any], job_id: str | None = None) -> Job:
        job = Job(id=job_id or new_id(), dialect=dialect, request=request, info=info)
        if self.queue.full():
            raise QueueFull()
        self.store.add(job)
        self._done[job.id] = threading.Event()
        try:
            self.queue.put_nowait(job.id)
        except queue.Full:
            self.store.delete(job.id)
            raise QueueFull() from None
        return job

    def wait(self, job_id: str, timeout: float) -> Job | None:
        event = self._done.get(job_id)
        if event is not None and not event.wait(timeout):
            return None
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.status in FINAL:
            return
        self._cancel.add(job_id)
        if job.status == "queued":
            self._finish(job_id, status="cancelled")

    def _finish(self, job_id: str, **fields: Any) -> None:
        self.store.update(job_id, completed_at=time.time(), **fields)
        event = self._done.pop(job_id, None)
        if event is not None:
            event.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            job = self.store.get(job_id)
            if job is None or job.status != "queued" or job_id in self._cancel:
                self._cancel.discard(job_id)
                continue
            request = GenerateRequest.from_dict(job.request)
            key = self.engine.batch_key(request) if self.max_batch > 1 else None
            self._run_batch([job, *self._take_compatible(key)] if key is not None else [job])

    def _progress(self, job: Job):
        def on_step(i: int, n: int) -> None:
            if job.id in self._cancel:
                raise Cancelled(job.id)
            self.store.update(job.id, progress=min(99, int(100 * i / n)))

        return on_step

    def _take_compatible(self, key: tuple) -> list[Job]:
        """Take up to max_batch - 1 more queued jobs that can share denoising passes with the one in hand."""
        taken: list[Job] = []
        with self.queue.mutex:
            for job_id in list(self.queue.queue):
                if len(taken) >= self.max_batch - 1:
                    break
                other = self.store.get(job_id)
                if (
                    other is not None
                    and other.status == "queued"
                    and job_id not in self._cancel
                    and self.engine.batch_key(GenerateRequest.from_dict(other.request)) == key
                ):
                    self.queue.queue.remove(job_id)
                    taken.append(other)
            self.queue.not_full.notify_all()
        return taken

    def _run_batch(self, batch: list[Job]) -> None:
        """One job, or queued jobs of one shape and schedule denoised together; each keeps its own outcome."""
        for job in batch:
            self.store.update(job.id, status="in_progress", progress=0)
        requests = [GenerateRequest.from_dict(job.request) for job in batch]
        try:
            with self.engine_lock:
                outcomes = self.engine.generate_batch(requests, [self._progress(job) for job in batch])
        except Exception as exc:  # a failing batch must not take the server down
            logger.exception("jobs %s failed", [job.id for job in batch])
            outcomes = [exc] * len(batch)
        for job, request, outcome in zip(batch, requests, outcomes, strict=True):
            try:
                if isinstance(outcome, Cancelled):
                    if self._stop.is_set():
                        error = {"code": 500, "message": "interrupted by a server shutdown; submit it again"}
                        self._finish(job.id, status="failed", error=error)
                    else:
                        self._finish(job.id, status="cancelled")
                elif isinstance(outcome, RequestError):
                    error = {"code": 400, "message": str(outcome), "param": outcome.field}
                    self._finish(job.id, status="failed", error=error)
                elif isinstance(outcome, Exception):
                    error = {"code": 500, "message": f"{type(outcome).__name__}: {outcome}"}
                    self._finish(job.id, status="failed", error=error)
                else:
                    outputs, summary = self._save(job, request, outcome)
                    self._finish(job.id, status="completed", progress=100, outputs=outputs, result=summary)
            except Exception as exc:  # saving one job's files failed; the others are unaffected
                logger.exception("job %s failed", job.id)
                self._finish(job.id, status="failed", error={"code": 500, "message": f"{type(exc).__name__}: {exc}"})
            finally:
                self._cancel.discard(job.id)

    def _save(self, job: Job, request: GenerateRequest, result) -> tuple[list[str], dict[str, Any]]:
        folder = self.job_dir(job.id)
        ext = "jpg" if result.video.shape[0] == 1 else "mp4"
        if job.info.get("image_format"):
            ext = job.info["image_format"]
        paths = result.save(folder / f"vision.{ext}")
        summary: dict[str, Any] = {
            "num_frames": int(result.video.shape[0]),
            "fps": result.fps,
            "height": int(result.video.shape[1]),
            "width": int(result.video.shape[2]),
            "seed": request.seed,
            "has_sound": result.sound is not None,
        }
        if result.action is not None:
            summary["action"] = result.action.tolist()
            summary["action_meta"] = result.metadata.get("action", {})
        return [str(p) for p in paths], summary

    def _sweep(self) -> None:
        """Remove finished jobs (record and files) once they are older than the retention period."""
        while not self._stop.wait(min(60.0, max(1.0, self.retention_s / 4))):
            cutoff = time.time() - self.retention_s
            for job in self.store.list(status=FINAL):
                if job.completed_at is not None and job.completed_at < cutoff:
                    shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
                    self.store.delete(job.id)


def new_id() -> str:
    return f"video_gen_{uuid.uuid4().hex}"
