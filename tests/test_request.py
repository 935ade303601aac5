"""The request model: defaults, aliases, and errors that name the field, the value and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest

from cosmos3.errors import RequestError
from cosmos3.generation.request import GenerateRequest


def resolve(**fields) -> GenerateRequest:
    return GenerateRequest.from_dict(fields).resolved(vae_factors=(16, 4))  # the Cosmos 3 VAE's factors


def test_documented_defaults():
    r = resolve(prompt="x")
    assert (r.mode, r.width, r.height, r.num_frames, r.fps, r.num_steps, r.guidance) == (
        "text2video",
        832,
        480,
        189,
        24.0,
        35,
        6.0,
    )
    assert resolve(mode="text2image", prompt="x").num_frames == 1


def test_framework_aliases():
    r = GenerateRequest.from_dict(
        {"model_mode": "text2image", "prompt": "x", "guidance_scale": 3.0, "num_inference_steps": 7, "flow_shift": 5.0}
    ).resolved()
    assert (r.mode, r.guidance, r.num_steps, r.shift) == ("text2image", 3.0, 7, 5.0)


def test_vision_path_picks_image_or_video_by_mode_and_suffix():
    assert GenerateRequest.from_dict({"model_mode": "image2video", "vision_path": "a.jpg"}).image == "a.jpg"
    assert GenerateRequest.from_dict({"model_mode": "video2video", "vision_path": "a.mp4"}).video == "a.mp4"
    assert GenerateRequest.from_dict({"model_mode": "policy", "vision_path": "a.mp4"}).video == "a.mp4"


def test_engine_defaults_fill_unset_fields_only():
    r = GenerateRequest(prompt="x", num_steps=3).resolved({"num_steps": 8, "resolution": "256"})
    assert r.num_steps == 3 and (r.width, r.height) == (320, 192)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mode": "text3video"}, "mode"),
        ({"prompt": 3}, "prompt"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"shift": -1.0}, "shift"),
        ({"seed": -1}, "seed"),
        ({"fps": 25}, "fps"),
        ({"num_frames": 4}, "num_frames"),
        ({"mode": "text2image", "num_frames": 5}, "num_frames"),
        ({"height": 480}, "width"),
        ({"height": 484, "width": 832}, "height"),
        ({"aspect_ratio": "21,9"}, "aspect_ratio"),
        ({"mode": "text2image", "enable_sound": True}, "enable_sound"),
        ({"mode": "text2video", "image": __file__}, "image"),
        ({"mode": "video2video"}, "video"),
        (
            {"mode": "video2video", "video": __file__, "num_frames": 9, "condition_frame_indexes_vision": [0, 3]},
            "condition_frame_indexes_vision",
        ),
        ({"mode": "video2video", "video": __file__, "condition_video_keep": "middle"}, "condition_video_keep"),
        ({"mode": "policy", "image": __file__}, "domain_name"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "resolution": "1080"}, "resolution"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "view_point": "top"}, "view_point"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "num_frames": 9}, "num_frames"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "action_chunk_size": 0}, "action_chunk_size"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "action": [[0, 0]]}, "action"),
        ({"mode": "inverse_dynamics", "image": __file__, "domain_name": "pusht", "chunks": 2}, "video"),
        ({"mode": "text2video", "chunks": 3}, "chunks"),
        ({"mode": "text2video", "domain_name": "pusht"}, "domain_name"),
    ],
)
def test_errors_name_field_value_and_allowed(fields, field):
    with pytest.raises(RequestError) as err:
        resolve(**{"prompt": "x", **fields})
    assert err.value.field == field
    message = str(err.value)
    assert message.startswith(f"{field}=") and "allowed:" in message


def test_unknown_field_is_an_error():
    with pytest.raises(RequestError, match="not a known field"):
        GenerateRequest.from_dict({"prompt": "x", "guidence": 3})


@pytest.mark.parametrize("name", ["../../escape", "/tmp/abs", "a/b", "a\\b", "..", ".", "", "a\0b", 5, ["a"]])
def test_name_must_be_one_plain_folder_name(name):
    # spec files and batch write <output-dir>/<name>/vision.*: no name may point outside that folder
    with pytest.raises(RequestError) as err:
        resolve(prompt="x", name=name)
    assert err.value.field == "name" and err.value.value == name
    assert "allowed: a plain folder name" in str(err.value) and "'..'" in str(err.value)


def test_plain_names_are_kept():
    for name in ("sample_0", "cup.v2", "..hidden", "a b"):
        assert resolve(prompt="x", name=name).name == name


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mode": "text2image", "num_frames": True}, "num_frames"),  # `true == 1` in Python: it passed as one frame
        ({"mode": "text2image", "num_frames": 1.0}, "num_frames"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "raw_action_dim": 2.0}, "raw_action_dim"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "num_frames": 17.0}, "num_frames"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "action_chunk_size": True}, "action_chunk_size"),
        ({"mode": "policy", "image": __file__, "domain_name": "pusht", "chunks": True}, "chunks"),
        ({"num_steps": True}, "num_steps"),
        ({"seed": False}, "seed"),
    ],
)
def test_bools_and_floats_are_not_integers(fields, field):
    with pytest.raises(RequestError) as err:
        resolve(**{"prompt": "x", **fields})
    assert err.value.field == field and "allowed:" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"), [("action_chunk_size", 8), ("raw_action_dim", 7), ("action_stats", {"mean": [0], "std": [1]})]
)
def test_action_fields_in_a_vision_mode_are_refused_not_ignored(field, value):
    with pytest.raises(RequestError) as err:
        resolve(mode="text2video", prompt="x", **{field: value})
    assert err.value.field == field and "only with mode in policy" in str(err.value)
    assert resolve(mode="policy", prompt="x", image=__file__, domain_name="pusht").action_chunk_size == 16


def test_chained_chunks_need_a_chunk_that_fills_whole_latent_frames():
    fields = {"mode": "policy", "prompt": "x", "image": __file__, "domain_name": "pusht", "chunks": 3}
    with pytest.raises(RequestError) as err:
        resolve(**fields, action_chunk_size=6)  # 5 frames a chunk (4 new) against 6 actions: the video falls behind
    assert err.value.field == "action_chunk_size" and "a multiple of the VAE's temporal factor 4" in str(err.value)
    assert resolve(**fields, action_chunk_size=8).chunks == 3
    assert resolve(**{**fields, "chunks": 1}, action_chunk_size=6).num_frames == 7  # one chunk: as the reference


def test_an_action_object_without_an_action_array_says_what_is_expected():
    from cosmos3.generation.actions import load_actions

    with pytest.raises(RequestError, match=r"an object with keys foo.*\[steps\]\[7\] array of numbers, or") as err:
        load_actions({"foo": 1}, 7)
    assert err.value.field == "action"
    assert load_actions({"action": [[0.5] * 7]}, 7).shape == (1, 7)


@pytest.mark.parametrize(
    ("image", "shown"),
    [
        (np.zeros((48, 64), np.uint8), "ndarray of shape [48, 64] and dtype uint8"),  # grayscale
        (np.zeros((48, 64, 4), np.uint8), "ndarray of shape [48, 64, 4] and dtype uint8"),  # RGBA: was a CHW shape
        (np.full((4, 4, 3), "a", dtype=object), "ndarray of shape [4, 4, 3] and dtype object"),  # was a TypeError
        ([[1, 2, 3]], "list"),
    ],
)
def test_an_in_memory_image_of_the_wrong_shape_or_kind_is_named_as_given(image, shown):
    from cosmos3.media import load_image

    with pytest.raises(RequestError) as err:
        load_image(image, "image")
    assert err.value.field == "image" and err.value.value == shown
    assert load_image(np.zeros((48, 64, 3), np.float32), "image").shape == (3, 48, 64)
