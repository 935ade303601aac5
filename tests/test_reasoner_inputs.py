"""Every decoded chat input is bounded: frames, sampling, pixels, duration and bytes, each a RequestError naming the
field and what is allowed, checked before the work it guards."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
from PIL import Image

import cosmos3
from cosmos3.reasoning import messages
from cosmos3.reasoning.messages import MediaReader, video_sampling

PART = {"type": "video_url", "video_url": {"url": "clip"}}


def encoded_video(fmt: str = "mp4", frames: int = 8, fps: int = 6, width: int = 96, height: int = 64) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i * 20, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def reader(data: bytes, num_frames: int | None = None) -> MediaReader:
    return MediaReader(lambda url, field: data, num_frames)


def refused(call, field: str, match: str) -> None:
    with pytest.raises(cosmos3.RequestError, match=match) as err:
        call()
    assert err.value.field == field


@pytest.fixture(scope="module")
def reasoner():
    return cosmos3.load("tiny", surfaces=["reasoner"]).reasoner


@pytest.mark.parametrize(
    ("fps", "num_frames", "field", "match"),
    [
        (None, 100_000, "media_io_kwargs.video.num_frames", "from 2 .* to 768"),
        (None, 0, "media_io_kwargs.video.num_frames", "from 2 .* to 768"),
        (None, 1, "media_io_kwargs.video.num_frames", "from 2 .* to 768"),  # the processor's temporal patch
        (None, "8", "media_io_kwargs.video.num_frames", "an integer"),
        (None, 2.5, "media_io_kwargs.video.num_frames", "an integer"),
        (None, True, "media_io_kwargs.video.num_frames", "an integer"),
        (0, None, "media_io_kwargs.video.fps", "above 0 and up to 60"),
        (-1.0, None, "media_io_kwargs.video.fps", "above 0"),
        (float("nan"), None, "media_io_kwargs.video.fps", "above 0"),
        (float("inf"), None, "media_io_kwargs.video.fps", "above 0"),
        (1e308, None, "media_io_kwargs.video.fps", "up to 60"),
        ("2", None, "media_io_kwargs.video.fps", "a number"),
        ([2], None, "media_io_kwargs.video.fps", "a number"),
        (2.0, 4, "media_io_kwargs.video", "either fps or num_frames"),
    ],
)
def test_sampling_requests_are_bounded_and_typed(fps, num_frames, field, match):
    refused(lambda: video_sampling(fps, num_frames), field, match)


def test_sampling_arguments_for_the_processor():
    assert video_sampling(None, None) == {}
    assert video_sampling(None, np.int64(768)) == {"num_frames": 768, "fps": None}
    assert video_sampling(2, None) == {"fps": 2.0}


def test_the_oversized_frame_request_is_refused_before_decoding(reasoner, monkeypatch):
    """The request that grew a server to 23.7 GB: a data: video with num_frames=100000."""
    monkeypatch.setattr(MediaReader, "decode_video", lambda *a: pytest.fail("decoded before the check"))
    url = "data:video/mp4;base64," + base64.b64encode(encoded_video()).decode()
    chat = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]
    refused(lambda: reasoner.encode(chat, video_num_frames=100_000), "media_io_kwargs.video.num_frames", "768")


def test_a_bounded_data_video_is_read(reasoner):
    url = "data:video/mp4;base64," + base64.b64encode(encoded_video()).decode()
    video = {"type": "video_url", "video_url": {"url": url}}
    chat = [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]
    assert len(reasoner.encode(chat, video_num_frames=4).input_ids) > 10


@pytest.mark.parametrize(
    ("fmt", "limit", "value", "match"),
    [
        ("mp4", "MAX_VIDEO_FRAMES", 5, "up to 5 frames"),  # stated in the header
        ("m4v", "MAX_VIDEO_FRAMES", 5, "up to 5 frames"),  # a raw stream states none: counted while decoding
        ("mp4", "MAX_VIDEO_SECONDS", 1.0, "up to 1 seconds"),
        ("mp4", "MAX_FRAME_PIXELS", 96 * 64 - 1, "frames up to 6,143 pixels"),
        ("mp4", "MAX_REQUEST_PIXELS", 7 * 96 * 64, "at most 43,008 decoded pixels"),
        ("mp4", "MAX_MEDIA_BYTES", 100, "media up to 100 bytes"),
    ],
)
def test_video_limits(monkeypatch, fmt, limit, value, match):
    data = encoded_video(fmt)
    monkeypatch.setattr(messages, limit, value)
    refused(lambda: reader(data).video(PART, "video_url", "where"), "where", match)


def test_frames_repeated_by_num_frames_count_against_the_request(monkeypatch):
    monkeypatch.setattr(messages, "MAX_REQUEST_PIXELS", 100 * 96 * 64)
    frames, fps = reader(encoded_video(), num_frames=100).video(PART, "video_url", "where")
    assert frames.shape == (8, 64, 96, 3) and fps == 6.0
    over = reader(encoded_video(), num_frames=101)
    refused(lambda: over.video(PART, "video_url", "where"), "media_io_kwargs.video.num_frames", "decoded pixels")


def test_undecodable_media_is_named():
    refused(lambda: reader(b"not a video").video(PART, "video_url", "where"), "where", "cannot be decoded")
    image_part = {"type": "image_url", "image_url": {"url": "x"}}
    refused(lambda: reader(b"not an image").image(image_part, "image_url", "where"), "where", "cannot be decoded")
    with pytest.raises(cosmos3.RequestError) as err:
        reader(b"not an image").image(image_part, "image_url", "where")
    assert "cannot identify image file" in str(err.value) and " object at 0x" not in str(err.value)


def test_a_one_frame_video_is_refused_by_its_part_not_by_the_processor(reasoner, monkeypatch):
    """The Qwen3-VL processor refuses a video of one frame ("t:1 must be larger than temporal_factor:2"), which
    named no part of the request."""
    refused(lambda: reader(encoded_video(frames=1)).video(PART, "video_url", "where"), "where", "at least 2 frames")
    conversation = [{"role": "user", "content": [{"type": "text", "text": "a"}, {**PART, "video_url": {"url": "x"}}]}]
    monkeypatch.setattr(reasoner, "_fetch", lambda url, field: encoded_video(frames=1))
    refused(lambda: reasoner.tokenize(conversation), "messages[0].content[1]", "at least 2 frames")
    monkeypatch.setattr(reasoner, "_fetch", lambda url, field: encoded_video(frames=2))
    assert reasoner.tokenize(conversation).ids.numel() > 0


def test_image_size_is_checked_from_the_header(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (150, 100)).save(buf, format="PNG")
    monkeypatch.setattr(messages, "MAX_IMAGE_PIXELS", 150 * 100 - 1)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the size check"))
    part = {"type": "image_url", "image_url": {"url": "x"}}
    refused(lambda: reader(buf.getvalue()).image(part, "image_url", "where"), "where", "up to 14,999 pixels")


@pytest.mark.parametrize(
    ("url", "fps", "field", "match"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), None, "where", "uint8"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 8, 3), np.uint8)], None, "where", "cannot be stacked"),
        (np.zeros((8, 8, 3), np.uint8), None, "where", r"\[T, H, W, 3\]"),
        ([], None, "where", "2 <= T"),
        (np.zeros((1, 8, 8, 3), np.uint8), None, "where", "2 <= T"),
        (np.zeros((4, 8, 8, 3), np.uint8), "6", "where.fps", "a number above 0"),
        (np.zeros((4, 8, 8, 3), np.uint8), -6, "where.fps", "a number above 0"),
        (12345, None, "where", "a URL or data URI string"),
    ],
)
def test_wrong_types_are_request_errors(url, fps, field, match):
    part = {"type": "video_url", "video_url": {"url": url}, "fps": fps}
    refused(lambda: reader(b"").video(part, "video_url", "where"), field, match)


def test_several_media_share_one_budget(monkeypatch):
    monkeypatch.setattr(messages, "MAX_REQUEST_PIXELS", 2 * 50 * 40)
    media = reader(b"")
    part = {"type": "image_url", "image_url": {"url": Image.new("RGB", (50, 40))}}
    media.image(part, "image_url", "first")
    media.image(part, "image_url", "second")
    refused(lambda: media.image(part, "image_url", "third"), "third", "over all images and video frames")


def test_an_unknown_reason_keyword_is_named_alone():
    engine = cosmos3.load("tiny", surfaces=["reasoner"])
    refused(lambda: engine.reason("hi", max_tokens=1, video_fps=2, bogus=1), "bogus", "a keyword of max_tokens, ")


def test_a_text_part_without_a_string_is_named_by_its_text():
    engine = cosmos3.load("tiny", surfaces=["reasoner"])
    message = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    refused(lambda: engine.reason(message, max_tokens=1), "messages[0].content[0].text", "a string")
