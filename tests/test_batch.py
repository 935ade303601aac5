"""`cosmos3 batch` on a local Ray with two engine actors and the tiny model: every valid entry written once and equal
to a plain run, invalid ones recorded with their errors, a second run does nothing, a killed actor's entry is run
elsewhere."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray

import cosmos3
from cosmos3.batch import MANIFEST, Entry, read_manifest, run

SMALL = {"height": 64, "width": 96, "num_steps": 1}
VALID = [{"model_mode": "text2image", "prompt": f"a cup {i}", "seed": i, **SMALL} for i in range(5)] + [
    {"model_mode": "text2video", "prompt": f"a robot {i}", "num_frames": 5, "seed": i, **SMALL} for i in range(5)
]
INVALID = [
    {"model_mode": "text2video", "prompt": "x", "num_frames": 4, **SMALL},  # not a valid frame count
    {"model_mode": "text3video", "prompt": "x"},
]


def entries() -> list[Entry]:
    return [Entry(f"sample_{i}", spec) for i, spec in enumerate(VALID + INVALID)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_batch_writes_each_valid_entry_once_and_resumes(local_ray, tmp_path):
    out = tmp_path / "out"
    summary = run(entries(), out, "tiny", workers=2, options={"device": "cpu"}, progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (10, 2, 0)
    rows = read_manifest(out)
    assert {rows[f"sample_{i}"]["status"] for i in range(10)} == {"done"}
    assert "num_frames=4" in rows["sample_10"]["error"] and "mode='text3video'" in rows["sample_11"]["error"]
    lines = (out / MANIFEST).read_text().splitlines()
    assert len(lines) == 12  # each entry once

    engine = cosmos3.load("tiny", device="cpu")
    for i in (0, 7):  # an image and a video, against a plain run of the same entry
        req = engine.request(cosmos3.GenerateRequest.from_dict({**VALID[i], "name": f"sample_{i}"}, "framework"))
        ext = "jpg" if i < 5 else "mp4"
        plain = engine.generate(req, progress=False).save(tmp_path / "plain" / f"{i}.{ext}")[0]
        assert (out / f"sample_{i}" / f"vision.{ext}").read_bytes() == plain.read_bytes()
        assert rows[f"sample_{i}"]["seed"] == VALID[i]["seed"]

    again = run(entries(), out, "tiny", workers=2, options={"device": "cpu"}, progress=False)
    assert (again.done, again.failed, again.skipped) == (0, 0, 12)
    assert len((out / MANIFEST).read_text().splitlines()) == 12


def test_a_killed_actor_has_its_entry_run_elsewhere(local_ray, tmp_path):
    out = tmp_path / "out"
    # Slower entries, and more than the two actors finish before the kill: it lands while both are busy (with 6,
    # a loaded machine once finished them all before the kill landed).
    count = 10
    specs = [
        {"model_mode": "text2video", "prompt": f"p{i}", "num_frames": 9, "seed": i, **SMALL, "num_steps": 16}
        for i in range(count)
    ]
    done: list = []
    thread = threading.Thread(
        target=lambda: done.append(
            run(
                [Entry(f"e{i}", s) for i, s in enumerate(specs)],
                out,
                "tiny",
                workers=2,
                retries=2,
                options={"device": "cpu"},
                progress=False,
            )
        )
    )
    thread.start()
    deadline = time.time() + 120
    while not (out / MANIFEST).is_file() or not (out / MANIFEST).read_text().strip():
        assert time.time() < deadline, "no entry finished"
        time.sleep(0.2)
    ray.kill(ray.get_actor("cosmos3-engine-0"))
    thread.join(timeout=300)
    summary = done[0]
    assert (summary.done, summary.failed) == (count, 0) and summary.retried >= 1
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == sorted(f"e{i}" for i in range(count))


def test_batch_command_reads_a_spec_and_reports(local_ray, tmp_path, capsys):
    from cosmos3.cli import main

    spec = tmp_path / "specs.jsonl"
    lines = [json.dumps({"name": "a", "model_mode": "text2image", "prompt": "a cup", **SMALL}), "{not json"]
    spec.write_text("\n".join(lines) + "\n")
    code = main(["batch", str(spec), "--output-dir", str(tmp_path / "out"), "--model", "tiny", "--device", "cpu"])
    assert code == 1  # the broken line failed alone
    captured = capsys.readouterr()
    assert "2 entries: 1 written" in captured.out and "failed sample_1" in captured.err
    assert (tmp_path / "out" / "a" / "vision.jpg").is_file()
