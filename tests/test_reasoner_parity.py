"""The Reasoner against transformers' Cosmos3OmniForConditionalGeneration on a unified checkpoint it saved itself."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    Cosmos3OmniConfig,
    Cosmos3OmniForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen3VLProcessor,
)
from transformers.image_utils import load_image
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

import cosmos3
from cosmos3.config import preset
from cosmos3.loading.checkpoint import CheckpointError
from cosmos3.loading.components import PROCESSOR_FILES
from cosmos3.loading.tiny import build_tokenizer, write_pipeline, write_reasoner_config
from cosmos3.reasoning import messages
from cosmos3.reasoning.decoding import Sampling, token_stream
from cosmos3.reasoning.messages import REASONING_SUFFIX
from cosmos3.reasoning.reasoner import split_reasoning
from cosmos3.reference import randomize


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """transformers' model saved as a Reasoner checkpoint folder (with the tiny pre-processor configs)."""
    folder = tmp_path_factory.mktemp("reasoner")
    cfg = preset("tiny")
    tokenizer = build_tokenizer()
    config = write_reasoner_config(folder, cfg, tokenizer)
    ref = Cosmos3OmniForConditionalGeneration(Cosmos3OmniConfig(**config)).eval()
    randomize(ref, seed=7)
    ref.generation_config.eos_token_id = tokenizer.eos_token_id
    ref.generation_config.pad_token_id = tokenizer.pad_token_id
    ref.save_pretrained(folder)  # unified flat names: layers.*.self_attn.to_q, norm_q, blocks.*, merger.* ...
    tokenizer.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module")
def pair(checkpoint):
    ref, folder = checkpoint
    return ref, cosmos3.load(folder, surfaces=["reasoner"])


def image(seed: int, w: int = 150, h: int = 100) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def video(seed: int, frames: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (frames, 64, 96, 3), dtype=np.uint8)


CASES = {
    "text": (
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What happens when a cup falls off a table?"},
        ],
        [],
        [],
    ),
    "image": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "IMG0"}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        [0],
        [],
    ),
    "video": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": "VID0"}},
                    {"type": "text", "text": "List the events."},
                ],
            }
        ],
        [],
        [0],
    ),
    "image-and-video": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": "IMG1"}},
                    {"type": "text", "text": "with"},
                    {"type": "video_url", "video_url": {"url": "VID1"}},
                ],
            }
        ],
        [1],
        [1],
    ),
}


def materialize(messages, images, videos):
    """Replace IMGn / VIDn placeholders by in-memory media (PIL image / frames with fps) for our API."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [dict(p) for p in content]
            for p in content:
                if p["type"] == "image_url":
                    p["image_url"] = {"url": image(int(p["image_url"]["url"][3:]))}
                if p["type"] == "video_url":
                    p["video_url"] = {"url": list(video(int(p["video_url"]["url"][3:])))}
                    p["fps"] = 6.0
        out.append({**m, "content": content})
    return out


def reference_inputs(engine, messages, images, videos):
    proc = engine.reasoner.processor
    template = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        template.append(
            {
                "role": m["role"],
                "content": [
                    {
                        "type": {"image_url": "image", "video_url": "video"}.get(p["type"], p["type"]),
                        **({"text": p["text"]} if p["type"] == "text" else {}),
                    }
                    for p in content
                ],
            }
        )
    text = proc.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        kwargs["images"] = [image(i) for i in images]
    if videos:
        kwargs["videos"] = [video(i) for i in videos]
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=12, fps=6.0) for _ in videos]
        kwargs["cap_pixels_per_frame"] = False
    return proc(text=[text], return_tensors="pt", **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_match(pair, case):
    ref, engine = pair
    messages, images, videos = CASES[case]
    inputs = reference_inputs(engine, messages, images, videos)
    with torch.no_grad():
        expected = ref(**inputs).logits[0]
    ours_messages = materialize(messages, images, videos)
    got = engine.reasoner.logits(ours_messages)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    with torch.no_grad():
        ref_tokens = ref.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    prompt = engine.reasoner.encode(ours_messages)
    greedy = Sampling(max_tokens=20, temperature=0, presence_penalty=0)
    stream = token_stream(engine.reasoner.transformer, [prompt], greedy, engine.reasoner.eos_token_ids)
    ours_tokens = [t[0].id for t in stream if t[0] is not None]
    assert ours_tokens == ref_tokens.tolist()[: len(ours_tokens)]
    assert len(ours_tokens) == 20 or ref_tokens[len(ours_tokens)] == engine.reasoner.tokenizer.eos_token_id


def test_video_sampling_by_fps_or_frame_count(pair):
    _, engine = pair
    messages = materialize(CASES["video"][0], [], [])
    by_count = engine.reasoner.encode(messages, video_num_frames=4)
    by_fps = engine.reasoner.encode(messages, video_fps=1.0)  # 12 frames at 6 fps = 2 s -> the minimum of 4 frames
    default = engine.reasoner.encode(messages)  # 2 fps -> 4 frames
    assert len(by_count.input_ids) == len(by_fps.input_ids) == len(default.input_ids)
    more = engine.reasoner.encode(messages, video_num_frames=8)
    assert len(more.input_ids) > len(by_count.input_ids)  # 4 temporal patches instead of 2
    with pytest.raises(cosmos3.RequestError, match="either fps or num_frames"):
        engine.reasoner.encode(messages, video_fps=2.0, video_num_frames=4)


def test_batch_matches_single(pair):
    _, engine = pair
    conversations = [materialize(CASES[c][0], [], []) for c in ("text", "image", "video")]
    singles = [engine.reason(c, max_tokens=12) for c in conversations]
    assert engine.reason_batch(conversations, max_tokens=12) == singles


def test_stream_pieces_join_to_the_reply(pair):
    _, engine = pair
    messages = CASES["text"][0]
    full = engine.reason(messages, max_tokens=15, temperature=0.7, top_p=0.8, top_k=20, seed=4)
    assert "".join(engine.reason_stream(messages, max_tokens=15, temperature=0.7, top_p=0.8, top_k=20, seed=4)) == full
    # Sampling is seeded: same seed, same reply; another seed, (almost surely) another reply.
    assert engine.reason(messages, max_tokens=15, temperature=0.7, seed=4) == engine.reason(
        messages, max_tokens=15, temperature=0.7, seed=4
    )


def test_generator_and_reasoner_share_weights(tmp_path):
    engine = cosmos3.load(write_pipeline(tmp_path / "p"))
    assert engine.generator is not None and engine.reasoner is not None
    assert engine.reasoner.transformer is engine.generator.parts.transformer
    assert engine.reason("hi", max_tokens=3) is not None
    only = cosmos3.load(tmp_path / "p", surfaces=["reasoner"])
    assert only.generator is None
    assert only.transformer.layers[0].mlp_moe_gen.up_proj.weight.is_meta  # the generation pathway is never loaded
    assert only.reason("hi", max_tokens=3) == engine.reason("hi", max_tokens=3)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": "x.wav"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages[-1].role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.jpg"}}]}],
            "messages[0].content[0]",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            "messages[0].content[0]",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such/file.png"}}]}],
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_messages_name_the_problem(pair, messages, field):
    _, engine = pair
    with pytest.raises(cosmos3.RequestError) as err:
        engine.reason(messages, max_tokens=2)
    assert err.value.field == field


def test_limits_are_stated(pair, monkeypatch):
    _, engine = pair
    monkeypatch.setattr(messages, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(cosmos3.RequestError, match="up to 1,000 pixels"):
        engine.reason([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image(1)}}]}])
    with pytest.raises(cosmos3.RequestError, match="max_tokens"):
        engine.reason("hi", max_tokens=0)


def test_reasoning_format(pair):
    _, engine = pair
    prompt = engine.reasoner.encode([{"role": "user", "content": "Is the cup stable?"}], reasoning=True)
    assert "</think>" in engine.reasoner.tokenizer.decode(prompt.input_ids) and "</think>" in REASONING_SUFFIX
    assert split_reasoning("<think>\nIt leans.\n</think>\n\nNo.") == ("It leans.", "No.")
    assert split_reasoning("just an answer") == ("", "just an answer")


# ------------------------------------------------------------------ inputs read as transformers reads them (item 7)
def variant(checkpoint, folder: Path, **video_settings) -> Path:
    """The checkpoint with its processor saved by transformers' `Qwen3VLProcessor.save_pretrained` (one
    `processor_config.json`, no per-processor files), with settings unlike any default: other sizes and mean/std."""
    _, source = checkpoint
    folder.mkdir()
    for item in source.iterdir():
        if item.name not in PROCESSOR_FILES:
            (folder / item.name).symlink_to(item)
    settings = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.4, 0.5, 0.6], image_std=[0.3] * 3)
    size = {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 12}
    Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings, size=size),
        video_processor=Qwen3VLVideoProcessor(
            **settings, size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64}, **video_settings
        ),
        tokenizer=build_tokenizer(),
        chat_template=build_tokenizer().chat_template,
    ).save_pretrained(folder)
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    return folder


def reference_of(ref, folder: Path, messages, images=None, videos=None, fps: float = 6.0):
    """transformers end to end: its AutoProcessor read from the folder, its model; returns (input_ids, logits)."""
    proc = AutoProcessor.from_pretrained(folder)
    template = [
        {
            "role": m["role"],
            "content": [
                {"type": p["type"].removesuffix("_url"), **({"text": p["text"]} if p["type"] == "text" else {})}
                for p in m["content"]
            ],
        }
        for m in messages
    ]
    text = proc.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(v), fps=fps) for v in videos]
    inputs = proc(text=[text], return_tensors="pt", **kwargs)
    with torch.no_grad():
        return inputs["input_ids"][0], ref(**inputs).logits[0]


def agree(engine, messages, ids, logits):
    prompt = engine.reasoner.encode(messages)
    assert prompt.input_ids.tolist() == ids.tolist()
    torch.testing.assert_close(engine.reasoner.logits(messages), logits, atol=1e-4, rtol=0)


def data_uri(image_: Image.Image, fmt: str, **save) -> str:
    buf = io.BytesIO()
    image_.save(buf, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_processor_config_json_is_read(checkpoint, tmp_path):
    """transformers 5's save_pretrained writes processor_config.json only: its sizes and mean/std are used."""
    ref, _ = checkpoint
    folder = variant(checkpoint, tmp_path / "v")
    engine = cosmos3.load(folder, surfaces=["reasoner"])
    assert engine.reasoner.processor.image_processor.image_mean == (0.4, 0.5, 0.6)
    for case in ("image", "video", "image-and-video"):
        chat, images, videos = CASES[case]
        ids, logits = reference_of(ref, folder, chat, [image(i) for i in images], [video(i) for i in videos])
        agree(engine, materialize(chat, images, videos), ids, logits)


def test_cap_pixels_per_frame_is_honoured(checkpoint, tmp_path):
    ref, _ = checkpoint
    capped = variant(checkpoint, tmp_path / "capped", cap_pixels_per_frame=True, max_video_tokens=2)
    chat, _, videos = CASES["video"]
    ids, logits = reference_of(ref, capped, chat, videos=[video(0)])
    engine = cosmos3.load(capped, surfaces=["reasoner"])
    agree(engine, materialize(chat, [], videos), ids, logits)
    uncapped = cosmos3.load(variant(checkpoint, tmp_path / "uncapped"), surfaces=["reasoner"])
    assert len(uncapped.reasoner.encode(materialize(chat, [], videos)).input_ids) > len(ids)  # the cap matters here


def test_exif_orientation_is_applied(checkpoint, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 reaches the model upright, as transformers'
    load_image (and vLLM) read it."""
    ref, _ = checkpoint
    folder = variant(checkpoint, tmp_path / "v")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    (tmp_path / "photo.jpg").write_bytes(b"")
    image(3, w=200, h=80).save(tmp_path / "photo.jpg", exif=exif.tobytes())
    chat = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG"}}, {"type": "text", "text": "?"}]}
    ]
    ids, logits = reference_of(ref, folder, chat, images=[load_image(str(tmp_path / "photo.jpg"))])
    engine = cosmos3.load(folder, surfaces=["reasoner"])
    uri = "data:image/jpeg;base64," + base64.b64encode((tmp_path / "photo.jpg").read_bytes()).decode()
    ours = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "?"}]}
    ]
    agree(engine, ours, ids, logits)
    grid = engine.reasoner.processor.image_processor(images=[Image.open(tmp_path / "photo.jpg")])["image_grid_thw"]
    upright = engine.reasoner.processor.image_processor(images=[load_image(str(tmp_path / "photo.jpg"))])
    assert grid.tolist() != upright["image_grid_thw"].tolist()  # sideways would have given another grid


def test_rgba_is_composited_on_white(checkpoint, tmp_path):
    ref, _ = checkpoint
    folder = variant(checkpoint, tmp_path / "v")
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 255, (90, 120, 4), dtype=np.uint8), "RGBA")
    chat = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG"}}, {"type": "text", "text": "?"}]}
    ]
    ids, logits = reference_of(ref, folder, chat, images=[rgba])  # the processor's own convert_to_rgb
    engine = cosmos3.load(folder, surfaces=["reasoner"])
    for url in (data_uri(rgba, "PNG"), rgba):  # from bytes and in memory
        ours = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ]
        agree(engine, ours, ids, logits)
    dropped = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": rgba.convert("RGB")}}]}]
    dropped[0]["content"].append({"type": "text", "text": "?"})
    assert not torch.allclose(engine.reasoner.logits(dropped), logits, atol=1e-4)  # dropping alpha would differ


def test_a_vision_checkpoint_without_processor_settings_is_an_error(checkpoint, tmp_path):
    _, source = checkpoint
    folder = tmp_path / "v"
    folder.mkdir()
    for item in source.iterdir():
        if item.name not in PROCESSOR_FILES:
            (folder / item.name).symlink_to(item)
    with pytest.raises(CheckpointError, match="no processor settings"):
        cosmos3.load(folder, surfaces=["reasoner"])
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        cosmos3.load(folder, surfaces=["reasoner"])
