"""`cosmos3 serve --media-io-kwargs JSON`: the server's default video sampling (vLLM's flag), read and checked at
startup with the request's own model, under every Reasoner route (chat, playground, `/predict`), a request's
media_io_kwargs winning field by field and mm_processor_kwargs over both."""

from __future__ import annotations

import base64

import pytest
import test_server as base
from fastapi.testclient import TestClient

from cosmos3.cli import _server_settings, build_parser, main
from cosmos3.errors import RequestError
from cosmos3.server.app import create_app
from cosmos3.server.chat import ProcessorKwargs, media_io_default, video_encode
from cosmos3.server.media_io import MediaIO, VideoIO
from cosmos3.ui import bridge

engine, settings = base.engine, base.settings  # the shared fixtures

VIDEO = "data:video/mp4;base64," + base64.b64encode(base.mp4_bytes(frames=9, fps=8)).decode()


def video_chat(**fields) -> dict:
    content = [{"type": "video_url", "video_url": {"url": VIDEO}}, {"type": "text", "text": "What happens?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "seed": 0, **fields}


@pytest.fixture()
def reads(engine, monkeypatch) -> list[dict]:
    """The encode keyword arguments of every conversation the Reasoner reads (the routes' one way in)."""
    seen: list[dict] = []
    read = engine.reasoner.read

    def spy(conversations, params, **encode):
        seen.append(encode)
        return read(conversations, params, **encode)

    monkeypatch.setattr(engine.reasoner, "read", spy)
    return seen


def prompt_tokens(client, **fields) -> int:
    r = client.post("/v1/chat/completions", json=video_chat(**fields))
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_the_server_default_changes_what_the_reasoner_reads(engine, settings, reads):
    with TestClient(create_app(engine, settings)) as client:
        plain = prompt_tokens(client)  # the processor's own sampling: 2 frames a second, at least 4
        eight = prompt_tokens(client, media_io_kwargs={"video": {"num_frames": 8}})
    assert reads == [{}, {"video_num_frames": 8}] and eight > plain
    settings.media_io_kwargs = media_io_default('{"video": {"num_frames": 8}}')
    with TestClient(create_app(engine, settings)) as client:
        assert prompt_tokens(client) == eight  # the default is what a request naming it gets
        # The request's field wins: -1 is every frame, sampled by the processor as on a server without the default.
        assert prompt_tokens(client, media_io_kwargs={"video": {"num_frames": -1}}) == plain
        assert prompt_tokens(client, media_io_kwargs={"video": {"num_frames": 12}}) > eight
    assert reads[2:] == [{"video_num_frames": 8}, {}, {"video_num_frames": 12}]


@pytest.mark.parametrize(
    ("default", "video", "processor", "encode"),
    [
        (None, None, None, {}),
        ({"video": {"num_frames": -1}}, None, None, {}),  # every frame read, the processor samples (the cookbook's)
        ({"video": {"num_frames": 16}}, None, None, {"video_num_frames": 16}),
        ({"video": {"fps": 4}}, None, None, {"video_fps": 4}),
        ({"video": {"num_frames": 16}}, {"num_frames": 8}, None, {"video_num_frames": 8}),
        ({"video": {"num_frames": 16}}, {"num_frames": -1}, None, {}),  # a request's -1 is every frame too
        # fps and num_frames are one choice: a request's pick replaces the server's (not a 400 for both)
        ({"video": {"num_frames": 16}}, {"fps": 2}, None, {"video_fps": 2}),
        ({"video": {"fps": 4}}, {"num_frames": 8}, None, {"video_num_frames": 8}),
        ({"video": {"fps": 4}}, {"num_frames": -1}, None, {"video_fps": 4}),  # -1 alone keeps the server's fps
        ({"video": {"num_frames": -1}}, {"fps": 2}, None, {"video_fps": 2}),
        ({"video": {}}, {"fps": 2}, None, {"video_fps": 2}),
        # mm_processor_kwargs wins over both, as before the default
        ({"video": {"num_frames": 16}}, {"num_frames": 8}, {"num_frames": 4}, {"video_num_frames": 4}),
        ({"video": {"num_frames": 16}}, None, {"fps": 1}, {"video_fps": 1}),
        (None, {"fps": 2}, {"fps": 1}, {"video_fps": 1}),
        (None, {"fps": 2}, {"num_frames": 4}, {"video_fps": 2, "video_num_frames": 4}),  # as today: a 400
    ],
)
def test_a_request_wins_field_by_field(default, video, processor, encode):
    got = video_encode(
        MediaIO.model_validate(default) if default is not None else None,
        VideoIO(**video) if video is not None else None,
        ProcessorKwargs(**processor) if processor is not None else None,
    )
    assert got == encode


def test_the_bounds_still_hold_over_the_merged_result(engine, settings):
    # A request's conflicting fields are still a 400 with a server default; the media limits bound num_frames -1.
    settings.media_io_kwargs = media_io_default('{"video": {"num_frames": -1}}')
    with TestClient(create_app(engine, settings)) as client:
        r = client.post(
            "/v1/chat/completions",
            json=video_chat(media_io_kwargs={"video": {"fps": 2}}, mm_processor_kwargs={"num_frames": 4}),
        )
        assert r.status_code == 400 and "either fps or num_frames" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json=video_chat(media_io_kwargs={"video": {"num_frames": 100_000}}))
        assert r.status_code == 400 and "768" in r.json()["error"]["message"]


def test_the_playground_and_predict_get_the_default(engine, settings, reads):
    settings.media_io_kwargs = media_io_default('{"video": {"num_frames": 4}}')
    with TestClient(create_app(engine, settings)) as client:
        server, conversations = client.app.state.server, client.app.state.conversations
        message = video_chat()["messages"][0]

        async def playground() -> list[str]:
            return [p async for p in bridge.stream_reply(server, conversations, [message], {"max_tokens": 2})]

        client.portal.call(playground)
        predict = {"model_mode": "reasoner", "prompt": "What happens?", "vision_path": VIDEO, "max_tokens": 2}
        for fields in ({}, {"video_fps": 2}):  # the hosted dialect's video_fps is its media_io_kwargs.video.fps
            r = client.post("/predict", json={**predict, **fields})
            assert r.status_code == 200, r.text
    assert reads == [{"video_num_frames": 4}, {"video_num_frames": 4}, {"video_fps": 2}]


def test_the_flag_reaches_the_settings():
    args = build_parser().parse_args(["serve", "--media-io-kwargs", '{"video": {"num_frames": -1}}'])
    assert _server_settings(args).media_io_kwargs == MediaIO(video=VideoIO(num_frames=-1))
    assert _server_settings(build_parser().parse_args(["serve"])).media_io_kwargs is None
    ui = build_parser().parse_args(["ui", "--media-io-kwargs", '{"video": {"fps": 4}}'])
    assert _server_settings(ui).media_io_kwargs == MediaIO(video=VideoIO(fps=4))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("num_frames=-1", "Invalid JSON"),
        ('{"video": {"frames": 8}}', "video.frames: Extra inputs"),
        ('{"image": {}}', "image: Extra inputs"),
        ('{"video": {"num_frames": "all"}}', "video.num_frames"),
        ('{"video": {"num_frames": 100000}}', "from 2 .* to 768 .*, or -1: every frame"),
        ('{"video": {"num_frames": 0}}', "from 2 .* to 768"),
        ('{"video": {"fps": 0}}', "above 0 and up to 60"),
        ('{"video": {"fps": 2, "num_frames": 8}}', "either fps or num_frames"),
    ],
)
def test_a_bad_flag_value_is_a_clear_error(value, match, capsys):
    with pytest.raises(RequestError, match=match) as err:
        _server_settings(build_parser().parse_args(["serve", "--media-io-kwargs", value]))
    assert err.value.field == "--media-io-kwargs" and err.value.value == value
    assert str(err.value).startswith(f"--media-io-kwargs={value!r} is not allowed (")
    # The shell sees one line and exit status 2, before any model is loaded.
    assert main(["serve", "--media-io-kwargs", value]) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and out.startswith("error: --media-io-kwargs=")
