"""Getting checkpoints from the hub: the exact snapshot_download arguments, the offline and gated errors, and a
checkpoint served from a real hub-cache layout with HF_HUB_OFFLINE=1 (no hub is reachable here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

import cosmos3
from cosmos3.cli import main
from cosmos3.loading.checkpoint import CheckpointError
from cosmos3.loading.components import HUB_FILES, hub_patterns, resolve_path
from cosmos3.loading.tiny import tiny_path

REPO = "nvidia/Cosmos3-Nano"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A clean environment: HF_HOME in tmp, no token, online unless a test says otherwise."""
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _snapshot(cache: Path, drop: tuple[str, ...] = ()) -> Path:
    """The tiny checkpoint laid out as huggingface_hub caches a download of REPO at COMMIT (refs/main -> commit)."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    folder = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_path(), folder, ignore=shutil.ignore_patterns(*drop))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return folder


def _fake_download(calls: list, folder: Path):
    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(folder)

    return snapshot_download


def test_load_downloads_only_what_the_surfaces_need(hub_env, tmp_path, monkeypatch):
    folder = _snapshot(hub_env / "hub")
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_download(calls, folder))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    engine = cosmos3.load(REPO, revision="v1.0", surfaces=["reasoner"], guardrails=False)
    assert engine.path == folder and engine.generator is None
    assert calls == [
        {
            "repo_id": REPO,
            "revision": "v1.0",
            "cache_dir": str(hub_env / "hub"),
            "allow_patterns": list(HUB_FILES["common"]),
            "local_files_only": False,
            "token": "hf_test_token",
        }
    ]
    # a reasoner-only load fetches neither the VAE, the scheduler nor the audio codec
    assert not {"vae/*", "scheduler/*", "sound_tokenizer/*"} & set(calls[0]["allow_patterns"])

    # everything (no surfaces given) adds the Generator's folders; HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_path(REPO) == folder
    assert calls[1]["cache_dir"] == str(tmp_path / "elsewhere") and calls[1]["token"] is None
    assert calls[1]["revision"] is None
    assert {"vae/*", "scheduler/*", "sound_tokenizer/*", "transformer/*"} <= set(calls[1]["allow_patterns"])
    assert calls[1]["allow_patterns"] == hub_patterns(None) == hub_patterns(["generator", "reasoner"])


def test_the_allow_patterns_select_the_right_files():
    from huggingface_hub.utils import filter_repo_objects

    files = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "text_tokenizer/tokenizer.json",
        "vision_encoder/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "sound_tokenizer/config.json",
        "assets/demo.mp4",
        "README.md",
    ]
    reasoner = set(filter_repo_objects(files, allow_patterns=hub_patterns(["reasoner"])))
    assert reasoner == set(files[:5])
    everything = set(filter_repo_objects(files, allow_patterns=hub_patterns(None)))
    assert everything == set(files[:9])  # never the demo assets or the model card


def test_offline_with_an_empty_cache_says_what_to_do(hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        cosmos3.load(REPO, surfaces=["reasoner"])  # the real snapshot_download, offline
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and str(hub_env / "hub") in message
    assert f"hf download {REPO}" in message and "Unset HF_HUB_OFFLINE" in message
    # the CLI prints that one line
    assert main(["reason", "--model", REPO, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CheckpointError:") and "HF_HUB_OFFLINE" in err and len(err.splitlines()) == 1


def test_offline_loads_a_cached_snapshot_and_records_its_commit(hub_env, tmp_path, monkeypatch):
    _snapshot(hub_env / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = cosmos3.load(REPO, guardrails=False)  # the real snapshot_download, reading the cache
    result = engine.generate(mode="text2image", prompt="a cup", height=64, width=96, num_steps=1, progress=False)
    result.record_origin(
        engine.request(mode="text2image", prompt="a cup", height=64, width=96, num_steps=1), engine.path
    )
    result.save(tmp_path / "out.jpg")
    model = json.loads((tmp_path / "out.jpg.json").read_text())["model"]
    assert model["repo_id"] == REPO and model["revision"] == COMMIT


def test_a_partial_snapshot_for_the_generator_is_a_clear_error(hub_env, monkeypatch):
    _snapshot(hub_env / "hub", drop=("vae", "scheduler", "sound_tokenizer"))  # what a reasoner-only load fetched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="lacks vae, scheduler/.*surfaces=\\['reasoner'\\]"):
        cosmos3.load(REPO, guardrails=False)


def _http_error(cls, status: int):
    request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls("refused", response=httpx.Response(status, request=request))


def test_gated_and_unknown_revision_errors_say_what_to_do(hub_env, monkeypatch):
    def gated(repo_id, **kwargs):
        raise _http_error(GatedRepoError, 403)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError) as info:
        resolve_path(REPO)
    assert "gated" in str(info.value) and f"https://huggingface.co/{REPO}" in str(info.value)
    assert "set HF_TOKEN" in str(info.value)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(CheckpointError, match="the token in HF_TOKEN"):
        resolve_path(REPO)

    def no_revision(repo_id, **kwargs):
        raise _http_error(RevisionNotFoundError, 404)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_revision)
    with pytest.raises(CheckpointError, match="has no revision 'v9'"):
        resolve_path(REPO, revision="v9")


def test_a_revision_for_a_local_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="applies to hub ids only"):
        resolve_path("tiny", revision="main")
    with pytest.raises(CheckpointError, match="applies to hub ids only"):
        resolve_path(tiny_path(), revision="main")
    with pytest.raises(CheckpointError, match="neither 'tiny'"):
        resolve_path(tmp_path / "missing")
