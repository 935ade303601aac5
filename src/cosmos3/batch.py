"""`cosmos3 batch`: many spec entries over many GPUs and machines, on Ray.

Ray starts one engine actor per GPU group (a group of G GPUs runs one parallel layout), the driver streams entries
to whichever actor is free, and every finished entry is written at once (its outputs, and a manifest row), so a run
that stops — Ctrl-C, a crash, a lost node — loses nothing that finished, and the same command resumes it.
Entries are Framework spec objects (`cosmos3 generate --spec`'s), resolved by the Framework dialect; a
`model_mode: "reasoner"` entry writes `<name>/reasoner_text.txt` (and its sidecar) instead of `vision.*`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cosmos3.errors import RequestError
from cosmos3.generation.request import check_name

MANIFEST = "manifest.jsonl"
logger = logging.getLogger(__name__)


@dataclass
class Entry:
    name: str
    spec: dict[str, Any]
    attempts: int = 0

    @property
    def key(self) -> str:
        """What the entry asks for: its output is reused only for the same spec (and model, see `run`)."""
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0  # attempts that failed for a transient reason (a lost worker) and went to another actor
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Entries finished per minute."""
        return 60.0 * self.done / self.seconds if self.seconds else 0.0


def batch_group(spec: dict[str, Any]) -> tuple:
    """Entries of one mode and size are given to the actors one after another, so that an actor sees batchable
    requests together (its engine batches nothing across calls, but shapes stay warm: caches, compiled kernels)."""
    keys = ("model_mode", "mode", "resolution", "aspect_ratio", "num_frames", "height", "width", "num_steps")
    return tuple(str(spec.get(k)) for k in keys)


class EngineWorker:
    """A Ray actor: one engine (on its GPU group) that runs entries and writes their outputs."""

    def __init__(self, model: str, options: dict[str, Any]):
        import cosmos3

        self.engine = cosmos3.load(model, **options)

    def run(self, name: str, spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
        from cosmos3.reason_request import REASONER_OUTPUT, ReasonRequest, reason, request_from_entry

        start = time.perf_counter()
        try:
            req = request_from_entry(spec, "framework")
            if isinstance(req, ReasonRequest):  # model_mode "reasoner": text, on an engine with the reasoner surface
                req = req.resolved()
                result, output = reason(self.engine, req), REASONER_OUTPUT
            else:
                req = self.engine.request(req)
                result = self.engine.generate(req, progress=False)
                output = "vision.jpg" if result.video.shape[0] == 1 else "vision.mp4"
        except RequestError as exc:  # the entry is invalid: no other actor, and no later run, would do better
            return {"name": name, "status": "invalid", "error": str(exc)}
        paths = result.save(Path(output_dir) / name / output)
        return {
            "name": name,
            "status": "done",
            "outputs": [str(p) for p in paths],
            "seed": req.seed,
            "seconds": round(time.perf_counter() - start, 3),
        }


def read_manifest(output_dir: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """The last row of each entry in the manifest (a later run appends; its rows win).

    Rows are appended whole and flushed one at a time, so a run killed mid-append (or a full disk) can leave only
    the last line cut short: that line is skipped with a warning naming it (its entry simply runs again), and with
    `repair` (a run about to append) cut off the file, so that the next row starts on a line of its own instead of
    being glued to the broken one. A bad line before the last one is an error naming it: no interrupted append
    leaves one, so something else damaged or edited the file, and what the row said (done, invalid, which outputs)
    is unknown; the run stops before it recomputes or overwrites anything, and the operator fixes or removes the
    line (that entry then runs again)."""
    rows: dict[str, dict[str, Any]] = {}
    path = output_dir / MANIFEST
    if not path.is_file():
        return rows
    data = path.read_bytes()  # bytes: a line of garbage must not hide the lines around it
    lines = data.split(b"\n")
    start = 0  # the offset of the current line in the file
    for number, line in enumerate(lines, 1):
        row, problem = _manifest_row(line) if line.strip() else (None, None)
        if problem is not None:
            if any(rest.strip() for rest in lines[number:]):
                long = len(repr(str(path))) > 80  # RequestError cuts a long value: then the text names the file
                raise RequestError(
                    "manifest",
                    path.name if long else str(path),
                    "one JSON object per line, as cosmos3 batch writes them (fix or remove that line; its entry then "
                    "runs again)",
                    f"line {number} {problem}" + (f" (file {path})" if long else ""),
                )
            logger.warning(
                "manifest=%r line %d %s: skipped (the end of an interrupted run?); its entry runs again",
                str(path),
                number,
                problem,
            )
            if repair:
                with path.open("r+b") as f:
                    f.truncate(start)
            return rows
        if row is not None:
            rows[row["name"]] = row
        start += len(line) + 1
    if repair and data and not data.endswith(b"\n"):  # a whole row whose newline was cut: finish its line
        with path.open("ab") as f:
            f.write(b"\n")
    return rows


def _manifest_row(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the row, None) for a good manifest line, else (None, what is wrong with it)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg}, column {exc.colno})"
    except RecursionError:
        return None, "is JSON nested too deeply to read"
    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        return None, "is not a manifest row (a JSON object with a name)"
    return row, None


def is_complete(row: dict[str, Any] | None, key: str) -> bool:
    """Finished for this spec and model: done with its outputs still there, or invalid (it would fail again)."""
    if row is None or row.get("key") != key:
        return False
    if row.get("status") == "invalid":
        return True
    return row.get("status") == "done" and all(Path(p).is_file() for p in row.get("outputs", []))


def run(
    entries: list[Entry],
    output_dir: Path,
    model: str,
    workers: int = 1,
    gpus_per_worker: int = 0,
    address: str | None = None,
    retries: int = 2,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Summary:
    """Run `entries` on `workers` engine actors (Ray at `address`, or a local Ray started here). Entries already
    complete in `output_dir` (the same spec, model and output files present) are skipped; a failing entry is retried
    on another actor up to `retries` times, an invalid one (RequestError) is recorded at once."""
    import ray

    names = [check_name(e.name) for e in entries]  # each writes <output_dir>/<name>/: never outside it
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise RequestError("name", duplicate, "a distinct name for every entry", "is used twice")
    if workers < 1:
        raise RequestError("workers", workers, "1 or more")
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    previous = read_manifest(output_dir, repair=True)  # before this run appends
    for entry in entries:
        entry.spec = {**entry.spec, "name": entry.name}
    todo = deque()
    for entry in sorted(entries, key=lambda e: batch_group(e.spec)):
        if is_complete(previous.get(entry.name), _key(entry, model)):
            summary.skipped += 1
        else:
            todo.append(entry)
    if not todo:
        return summary

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    actor_class = ray.remote(num_gpus=gpus_per_worker, num_cpus=0 if gpus_per_worker else 1)(EngineWorker)
    started = iter(range(1 << 30))

    def new_actor():  # named, so that operators (and tests) can find a run's actors: cosmos3-engine-0, -1, ...
        return actor_class.options(name=f"cosmos3-engine-{next(started)}").remote(model, options or {})

    actors = [new_actor() for _ in range(workers)]
    running: dict[Any, tuple[Any, Entry]] = {}  # ObjectRef -> (actor, entry)
    idle = list(actors)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="entries", unit="entry", disable=not progress)
    with (output_dir / MANIFEST).open("a") as manifest:

        def record(entry: Entry, row: dict[str, Any]) -> None:
            row = {**row, "key": _key(entry, model)}
            row.pop("retry", None)
            manifest.write(json.dumps(row) + "\n")
            manifest.flush()
            if row["status"] == "done":
                summary.done += 1
            else:  # failed after its retries, or invalid
                summary.failed += 1
                summary.errors[entry.name] = row["error"]
            bar.update()

        try:
            while todo or running:
                while todo and idle:
                    actor, entry = idle.pop(), todo.popleft()
                    entry.attempts += 1
                    running[actor.run.remote(entry.name, entry.spec, str(output_dir))] = (actor, entry)
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, entry = running.pop(ready[0])
                try:
                    row = ray.get(ready[0])
                    idle.append(actor)
                except ray.exceptions.RayActorError as exc:  # the actor died: its entry goes to another one
                    row = {"name": entry.name, "status": "failed", "error": f"worker lost: {exc}", "retry": True}
                    idle.append(new_actor())
                    actors.append(idle[-1])
                except ray.exceptions.RayTaskError as exc:
                    row = {"name": entry.name, "status": "failed", "error": str(exc.cause), "retry": True}
                    idle.append(actor)
                if row["status"] == "failed" and row.get("retry") and entry.attempts <= retries:
                    summary.retried += 1
                    todo.append(entry)
                else:
                    record(entry, row)
        finally:  # Ctrl-C included: what finished is in the manifest already
            bar.close()
            summary.seconds = time.perf_counter() - start
            for actor in actors:
                ray.kill(actor)
    return summary


def _key(entry: Entry, model: str) -> str:
    return hashlib.sha256(f"{entry.key}:{model}".encode()).hexdigest()[:16]
