"""`cosmos3 batch` on a local Ray with two engine actors and the tiny model: every valid entry written once and equal
to a plain run, invalid ones recorded with their errors, a second run does nothing, a killed actor's entry is run
elsewhere."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray

import cosmos3
from cosmos3.batch import MANIFEST, Entry, read_manifest, run
from cosmos3.errors import RequestError

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


def _rows(*names: str) -> bytes:
    return b"".join(
        json.dumps({"name": n, "status": "done", "outputs": [], "key": "k"}).encode() + b"\n" for n in names
    )


@pytest.mark.parametrize("tail", [b'{"name": "c", "status": "compl', b"\xff\xfe\x00garbage", b"[1, 2]\n"])
def test_a_cut_last_manifest_line_is_skipped_with_a_warning_and_cut_off(tmp_path, caplog, tail):
    manifest = tmp_path / MANIFEST
    manifest.write_bytes(_rows("a", "b") + tail)
    with caplog.at_level("WARNING", logger="cosmos3.batch"):
        assert set(read_manifest(tmp_path)) == {"a", "b"}  # reading alone changes nothing
    assert f"manifest={str(manifest)!r} line 3 " in caplog.text and "runs again" in caplog.text
    assert manifest.read_bytes() == _rows("a", "b") + tail
    assert set(read_manifest(tmp_path, repair=True)) == {"a", "b"}  # a run about to append cuts it off
    assert manifest.read_bytes() == _rows("a", "b")


def test_a_whole_last_row_without_its_newline_is_kept_and_finished(tmp_path):
    manifest = tmp_path / MANIFEST
    manifest.write_bytes(_rows("a", "b")[:-1])
    assert set(read_manifest(tmp_path, repair=True)) == {"a", "b"}
    assert manifest.read_bytes() == _rows("a", "b")  # the next row starts on a line of its own


@pytest.mark.parametrize("bad", [b'{"name": "x", "sta\n', b"\xff\xfe\n", b"[1]\n"])
def test_a_bad_manifest_line_before_the_last_is_an_error_naming_it(tmp_path, bad):
    manifest = tmp_path / MANIFEST
    manifest.write_bytes(_rows("a") + bad + _rows("b"))
    with pytest.raises(RequestError) as err:
        read_manifest(tmp_path, repair=True)
    assert err.value.field == "manifest" and str(manifest) in str(err.value) and "line 2 " in str(err.value)
    assert "allowed: one JSON object per line" in str(err.value)
    assert manifest.read_bytes() == _rows("a") + bad + _rows("b")  # untouched


def test_batch_command_resumes_after_an_interrupted_manifest_append(local_ray, tmp_path, capsys):
    from cosmos3.cli import main

    spec = tmp_path / "specs.jsonl"
    spec.write_text(
        "".join(json.dumps({"name": n, "model_mode": "text2image", "prompt": n, **SMALL}) + "\n" for n in "ab")
    )
    out = tmp_path / "out"
    command = ["batch", str(spec), "--output-dir", str(out), "--model", "tiny", "--device", "cpu"]
    assert main(command) == 0
    (out / "b" / "vision.jpg").unlink()  # b's row is cut short below: its entry runs again
    lines = (out / MANIFEST).read_bytes().splitlines(keepends=True)
    row_b = next(line for line in lines if b'"name": "b"' in line)
    (out / MANIFEST).write_bytes(b"".join(line for line in lines if line != row_b) + row_b[:30])
    capsys.readouterr()
    assert main(command) == 0  # was: error: JSONDecodeError ..., exit status 1
    assert "2 entries: 1 written, 1 skipped (complete), 0 failed" in capsys.readouterr().out
    assert {json.loads(line)["name"] for line in (out / MANIFEST).read_text().splitlines()} == {"a", "b"}
    assert (out / "b" / "vision.jpg").is_file()


def test_batch_names_cannot_leave_the_output_dir(local_ray, tmp_path, capsys):
    from cosmos3.cli import main

    with pytest.raises(RequestError, match=r"name='\.\./x' is not allowed; allowed: a plain folder name"):
        run([Entry("../x", VALID[0])], tmp_path / "out", "tiny", progress=False)
    spec = tmp_path / "deep" / "spec.json"
    spec.parent.mkdir()
    entries = [{"name": "../../escape", **VALID[0]}, {"name": "/tmp/cosmos3-escape", **VALID[1]}]
    spec.write_text(json.dumps(entries))
    command = ["batch", str(spec), "--output-dir", str(tmp_path / "deep" / "out"), "--model", "tiny", "--device", "cpu"]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "failed sample_0: name='../../escape' is not allowed" in err and "failed sample_1: name='/tmp/" in err
    assert not list(tmp_path.rglob("vision.*")) and not (tmp_path / "escape").exists()
    assert not Path("/tmp/cosmos3-escape").exists()
