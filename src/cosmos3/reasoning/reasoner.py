"""The Reasoner: text from text, images and video, decoded on the understanding pathway the Generator also uses.

Pre-processing is transformers' Qwen3-VL processor and the vision tower is transformers' Qwen3-VL vision model (with
the checkpoint's vision weights); position ids, DeepStack injection, the KV cache, batching and sampling are ours.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cosmos3.errors import RequestError
from cosmos3.media import fetch_bytes
from cosmos3.model.layers import rope_cos_sin
from cosmos3.model.transformer import Cosmos3Transformer, KVCache

# The documents' explicit-reasoning instruction, appended to the last user message when `reasoning=True`.
REASONING_SUFFIX = (
    "Answer the question using the following format:\n<think>\nYour reasoning.\n</think>\n\n"
    "Write your final answer immediately after the </think> tag."
)

MAX_IMAGE_PIXELS = 64_000_000  # per image, before resizing
MAX_VIDEO_FRAMES = 4096  # decoded frames per video, before sampling
ROLES = ("system", "user", "assistant")


@dataclass
class Sampling:
    """Decoding settings (OpenAI / vLLM names). temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def check(self) -> Sampling:
        def number(name, lo, hi, integer=False):
            value = getattr(self, name)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value) or not lo <= value <= hi:
                raise RequestError(name, value, f"{'an integer' if integer else 'a number'} from {lo} to {hi}")

        number("max_tokens", 1, 131072, integer=True)
        number("temperature", 0.0, 10.0)
        number("top_p", 1e-6, 1.0)
        number("top_k", 0, 1_000_000, integer=True)
        number("repetition_penalty", 1e-3, 10.0)
        number("presence_penalty", -2.0, 2.0)
        number("seed", 0, 2**63 - 1, integer=True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop", self.stop, "a non-empty string or a list of them")
        return self


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an explicit-reasoning reply: the answer is what follows `</think>`."""
    if "</think>" not in text:
        return "", text.strip()
    thought, answer = text.split("</think>", 1)
    answer = answer.strip()
    if answer.startswith("<answer>"):
        answer = answer[len("<answer>") :].split("</answer>", 1)[0].strip()
    return thought.replace("<think>", "").strip(), answer


# ---------------------------------------------------------------------------------------------------- media
def decode_image(data: bytes | Image.Image, field: str) -> Image.Image:
    if isinstance(data, Image.Image):
        image = data
    else:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:
            raise RequestError(field, "<image bytes>", "a JPEG/PNG/WebP image", f"cannot be decoded ({exc})") from exc
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise RequestError(
            field, f"{image.width}x{image.height}", f"images up to {MAX_IMAGE_PIXELS:,} pixels", "is too large"
        )
    return image.convert("RGB")


def decode_video(data: bytes, field: str) -> tuple[np.ndarray, float | None]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            frames = []
            for frame in container.decode(stream):
                if len(frames) >= MAX_VIDEO_FRAMES:
                    raise RequestError(
                        field, "<video>", f"videos up to {MAX_VIDEO_FRAMES} frames", "has too many frames"
                    )
                if frame.width * frame.height > MAX_IMAGE_PIXELS:
                    raise RequestError(
                        field,
                        f"{frame.width}x{frame.height}",
                        f"frames up to {MAX_IMAGE_PIXELS:,} pixels",
                        "is too large",
                    )
                frames.append(frame.to_ndarray(format="rgb24"))
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(field, "<video bytes>", "an MP4/WebM/MOV video", f"cannot be decoded ({exc})") from exc
    if not frames:
        raise RequestError(field, "<video>", "a video with at least one frame", "has no frames")
    return np.stack(frames), fps


class DecodeStep:
    """Runs a static-shape decode step eagerly, or on a GPU captures it once in a CUDA graph and replays it: a
    token then costs one launch instead of a few hundred (decoding is bound by launch overhead otherwise)."""

    def __init__(self, step, device: torch.device):
        self.step = step
        self.use_graph = device.type == "cuda"
        self.graph = None
        self.output: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if not self.use_graph:
            return self.step()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graph capture requires
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.step()
        self.graph.replay()
        return self.output.clone()


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


@dataclass
class Prompt:
    """One conversation, ready for the language model."""

    input_ids: torch.Tensor  # [L]
    positions: torch.Tensor  # [3, L] mRoPE ids
    embeds: torch.Tensor  # [L, H], vision features already in place
    visual_mask: torch.Tensor | None = None  # [L] True at vision tokens
    deepstack: list[torch.Tensor] | None = None  # per early layer, [n_visual, H]

    @property
    def next_position(self) -> int:
        return int(self.positions.max()) + 1


class Reasoner:
    def __init__(
        self,
        transformer: Cosmos3Transformer,
        tokenizer,
        processor=None,
        vision=None,
        reasoner_config: dict | None = None,
        eos_token_ids: list[int] | None = None,
        allowed_media_dir: Path | None = None,
    ):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.processor = processor
        self.vision = vision
        cfg = reasoner_config or {}
        self.image_token_id = cfg.get("image_token_id", tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        self.video_token_id = cfg.get("video_token_id", tokenizer.convert_tokens_to_ids("<|video_pad|>"))
        self.merge = (cfg.get("vision_config") or {}).get("spatial_merge_size", 2)
        ids = set(eos_token_ids or [])
        ids.add(tokenizer.eos_token_id)
        for token in ("<|im_end|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
        self.eos_token_ids = sorted(i for i in ids if i is not None)
        self.allowed_media_dir = allowed_media_dir
        self.allow_local = True  # a server without an allowed media folder turns local paths off

    @property
    def device(self) -> torch.device:
        return self.transformer.embed_tokens.weight.device

    # ------------------------------------------------------------------------------------------- prompts
    def _template_messages(self, messages: Any, reasoning: bool) -> tuple[list[dict], list, list]:
        """Validate OpenAI / Qwen3-VL messages; returns (template messages, images, videos) in order."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages", messages, "a non-empty list of {role, content} messages")
        out, images, videos = [], [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES:
                raise RequestError(
                    f"messages[{i}].role", msg.get("role") if isinstance(msg, dict) else msg, ", ".join(ROLES)
                )
            content = msg.get("content")
            if isinstance(content, str):
                out.append({"role": msg["role"], "content": [{"type": "text", "text": content}]})
                continue
            if not isinstance(content, list):
                raise RequestError(f"messages[{i}].content", content, "a string or a list of content parts")
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "image"):
                    images.append(self._load_image(part, kind, where))
                    parts.append({"type": "image"})
                elif kind in ("video_url", "video"):
                    videos.append(self._load_video(part, kind, where))
                    parts.append({"type": "video"})
                else:
                    raise RequestError(f"{where}.type", kind, "text, image_url, video_url, image, video")
            out.append({"role": msg["role"], "content": parts})
        if out[-1]["role"] == "assistant":
            raise RequestError(
                "messages[-1].role", "assistant", "a user or system message last when a reply is asked for"
            )
        if reasoning:
            last_user = max(i for i, m in enumerate(out) if m["role"] != "assistant")
            out[last_user]["content"].append({"type": "text", "text": "\n" + REASONING_SUFFIX})
        if (images or videos) and (self.vision is None or self.processor is None):
            raise RequestError(
                "messages",
                "<image or video part>",
                "text-only messages for this checkpoint",
                "needs a vision tower, and this checkpoint has none (no blocks.*/merger.* weights or "
                "no vision_config in config.json)",
            )
        return out, images, videos

    @staticmethod
    def _url(part: dict, kind: str, where: str) -> Any:
        value = part.get(kind)
        if isinstance(value, dict):
            value = value.get("url")
        if value is None:
            raise RequestError(f"{where}.{kind}", value, "a URL string or {url: ...}", "is missing")
        return value

    def _load_image(self, part: dict, kind: str, where: str) -> Image.Image:
        value = self._url(part, kind, where)
        if isinstance(value, Image.Image):
            return decode_image(value, where)
        if isinstance(value, np.ndarray):
            return decode_image(Image.fromarray(value), where)
        return decode_image(fetch_bytes(str(value), where, self.allowed_media_dir, self.allow_local), where)

    def _load_video(self, part: dict, kind: str, where: str) -> tuple[np.ndarray, float | None]:
        value = self._url(part, kind, where)
        if isinstance(value, (list, np.ndarray)):  # pre-decoded frames
            frames = np.stack([np.asarray(f) for f in value])
            if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) > MAX_VIDEO_FRAMES:
                raise RequestError(
                    where, f"frames of shape {list(frames.shape)}", f"[T<={MAX_VIDEO_FRAMES}, H, W, 3] uint8 frames"
                )
            return frames.astype(np.uint8), part.get("fps")
        return decode_video(fetch_bytes(str(value), where, self.allowed_media_dir, self.allow_local), where)

    def encode(
        self,
        messages: list[dict],
        reasoning: bool = False,
        video_fps: float | None = None,
        video_num_frames: int | None = None,
    ) -> Prompt:
        template_messages, images, videos = self._template_messages(messages, reasoning)
        if self.processor is not None:
            text = self.processor.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
        else:
            text = self.tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
        if not images and not videos:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            return self._text_prompt(ids.to(self.device))
        return self._vision_prompt(text, images, videos, video_fps, video_num_frames)

    def _text_prompt(self, ids: torch.Tensor) -> Prompt:
        positions = torch.arange(len(ids), device=self.device).expand(3, -1)
        return Prompt(ids, positions, self.transformer.embed_tokens(ids))

    def _vision_prompt(self, text, images, videos, video_fps, video_num_frames) -> Prompt:
        from transformers.video_utils import VideoMetadata

        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            if video_fps is not None and video_num_frames is not None:
                raise RequestError(
                    "media_io_kwargs.video",
                    {"fps": video_fps, "num_frames": video_num_frames},
                    "either fps or num_frames",
                )
            kwargs["videos"] = [frames for frames, _ in videos]
            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(f), fps=fps) for f, fps in videos]
            kwargs["cap_pixels_per_frame"] = False  # the reference's current behaviour, stated to silence its warning
            if video_fps is not None:
                kwargs["fps"] = video_fps
            if video_num_frames is not None:  # fps=None: the processor's default fps would conflict with it
                kwargs.update(num_frames=video_num_frames, fps=None)
        try:
            batch = self.processor(text=[text], **kwargs)
        except RequestError:
            raise
        except ValueError as exc:
            raise RequestError(
                "messages", "<media>", "images and videos the Qwen3-VL processor accepts", str(exc)
            ) from exc
        ids = batch["input_ids"][0].to(self.device)
        types = batch["mm_token_type_ids"][0].tolist()
        grids = {1: list(batch.get("image_grid_thw", [])), 2: []}
        for thw in batch.get("video_grid_thw", []):  # one grid per temporal patch (frames carry timestamps)
            grids[2].extend([torch.tensor([1, thw[1], thw[2]])] * int(thw[0]))
        positions = self.rope_positions(types, grids)

        embeds = self.transformer.embed_tokens(ids)
        dtype = self.transformer.dtype
        visual_mask = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
        deepstack: list[torch.Tensor] | None = None
        for pixel_key, grid_key, token_id in (
            ("pixel_values", "image_grid_thw", self.image_token_id),
            ("pixel_values_videos", "video_grid_thw", self.video_token_id),
        ):
            if pixel_key not in batch:
                continue
            out = self.vision(batch[pixel_key].to(self.device, dtype), grid_thw=batch[grid_key].to(self.device))
            mask = ids == token_id
            if int(mask.sum()) != out.pooler_output.shape[0]:
                raise RequestError(
                    "messages",
                    "<media>",
                    "one placeholder per vision feature",
                    f"produced {int(mask.sum())} placeholders for {out.pooler_output.shape[0]} features",
                )
            embeds = embeds.clone()
            embeds[mask] = out.pooler_output.to(embeds.dtype)
            # DeepStack features, laid out over all visual tokens of the sequence (images and videos together).
            if deepstack is None:
                deepstack = [embeds.new_zeros(0, embeds.shape[-1])] * len(out.deepstack_features)
            joint_mask = visual_mask | mask
            merged = []
            for prev, feat in zip(deepstack, out.deepstack_features, strict=True):
                joint = feat.new_zeros(int(joint_mask.sum()), feat.shape[-1])
                joint[mask[joint_mask]] = feat
                joint[visual_mask[joint_mask]] = prev.to(feat.dtype)
                merged.append(joint)
            deepstack, visual_mask = merged, joint_mask
        return Prompt(ids, positions, embeds, visual_mask, deepstack)

    def rope_positions(self, token_types: list[int], grids: dict[int, list]) -> torch.Tensor:
        """Qwen3-VL mRoPE ids: text runs count up on all rows; a vision grid starting at p gets t = p, h = p + row,
        w = p + col (merged units) and advances p by max(rows, cols)."""
        iters = {k: iter(v) for k, v in grids.items()}
        pieces, pos = [], 0
        for kind, group in itertools.groupby(token_types):
            n = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(pos, pos + n).expand(3, -1))
                pos += n
                continue
            thw = next(iters[kind])
            t, h, w = int(thw[0]), int(thw[1]) // self.merge, int(thw[2]) // self.merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h) + pos, torch.arange(w) + pos, indexing="ij")
            pieces.append(torch.stack([tt + pos, hh, ww]).reshape(3, -1))
            pos += max(h, w)
        return torch.cat(pieces, dim=1).to(self.device)

    # ------------------------------------------------------------------------------------------- model
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.transformer.config
        return rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.transformer.dtype)

    @torch.inference_mode()
    def logits(self, messages: list[dict], **encode_kwargs: Any) -> torch.Tensor:
        """Next-token logits at every position of the templated prompt, `[L, vocab]` fp32 (for scoring and tests)."""
        prompt = self.encode(messages, **encode_kwargs)
        cache = KVCache(self.transformer.config, 1, len(prompt.input_ids), self.device, self.transformer.dtype)
        cos, sin = self._rope(prompt.positions[:, None])
        deepstack = (prompt.visual_mask[None], prompt.deepstack) if prompt.deepstack else None
        hidden = self.transformer.causal_forward(prompt.embeds[None], cos, sin, cache, deepstack=deepstack)
        return self.transformer.lm_head(hidden[0]).float()

    @torch.inference_mode()
    def token_stream(self, prompts: list[Prompt], params: Sampling) -> Iterator[list[int | None]]:
        """Yield one new token per prompt per step (None once a prompt has finished)."""
        tf = self.transformer
        batch = len(prompts)
        lengths = [len(p.input_ids) for p in prompts]
        width = max(lengths)
        hidden_size = tf.config.hidden_size
        embeds = torch.zeros(batch, width, hidden_size, device=self.device, dtype=tf.dtype)
        positions = torch.zeros(3, batch, width, dtype=torch.long, device=self.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        visual = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        for b, p in enumerate(prompts):  # left padding keeps every prompt's last token in the last column
            embeds[b, width - lengths[b] :] = p.embeds
            positions[:, b, width - lengths[b] :] = p.positions
            valid[b, width - lengths[b] :] = True
            if p.visual_mask is not None:
                visual[b, width - lengths[b] :] = p.visual_mask
        deepstack = None
        with_vision = [p for p in prompts if p.deepstack]
        if with_vision:
            layers = len(with_vision[0].deepstack)
            deepstack = (visual, [torch.cat([p.deepstack[i] for p in with_vision]) for i in range(layers)])

        padded = not all(valid.flatten().tolist())
        mask = None
        if padded:
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            mask = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)
            mask = mask[:, None]
        cache = KVCache(tf.config, batch, width + params.max_tokens, self.device, tf.dtype)
        cos, sin = self._rope(positions)
        hidden = tf.causal_forward(embeds, cos, sin, cache, attn_mask=mask, deepstack=deepstack)
        logits = tf.lm_head(hidden[:, -1]).float()

        # Decoding: one static-shape step (see Cosmos3Transformer.decode_step), replayed as a CUDA graph on a GPU.
        total = width + params.max_tokens
        slots = torch.zeros(batch, total, dtype=torch.bool, device=self.device)
        slots[:, :width] = valid
        step_tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        step_positions = torch.zeros(3, batch, 1, dtype=torch.long, device=self.device)
        write_at = torch.zeros(1, dtype=torch.long, device=self.device)
        decode = DecodeStep(lambda: tf.decode_step(step_tokens, step_positions, cache, write_at, slots), self.device)

        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seen = [p.input_ids.tolist() for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        next_pos = torch.tensor([p.next_position for p in prompts], device=self.device)
        done = [False] * batch
        eos = set(self.eos_token_ids)
        for step in range(params.max_tokens):
            tokens = self.sample(logits, params, seen, generated, generator)
            out: list[int | None] = []
            for b, tok in enumerate(tokens.tolist()):
                if done[b]:
                    out.append(None)
                    continue
                if tok in eos:
                    done[b] = True
                    out.append(None)
                    continue
                seen[b].append(tok)
                generated[b].append(tok)
                out.append(tok)
            yield out
            if all(done) or step == params.max_tokens - 1:
                return
            step_tokens.copy_(tokens)
            step_positions.copy_((next_pos + step).view(1, batch, 1).expand(3, -1, -1))
            write_at.fill_(width + step)
            slots[:, width + step] = True
            logits = decode()

    @staticmethod
    def sample(logits: torch.Tensor, params: Sampling, seen: list[list[int]], generated: list[list[int]], generator):
        logits = logits.clone()
        for b in range(logits.shape[0]):
            if params.repetition_penalty != 1.0 and seen[b]:
                idx = torch.tensor(sorted(set(seen[b])), device=logits.device)
                score = logits[b, idx]
                logits[b, idx] = torch.where(
                    score < 0, score * params.repetition_penalty, score / params.repetition_penalty
                )
            if params.presence_penalty and generated[b]:
                idx = torch.tensor(sorted(set(generated[b])), device=logits.device)
                logits[b, idx] -= params.presence_penalty
        if params.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / params.temperature
        if params.top_k > 0:
            k = min(params.top_k, logits.shape[-1])
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # ------------------------------------------------------------------------------------------- text
    def complete(self, conversations: list[list[dict]], params: Sampling, **encode_kwargs: Any) -> list[Reply]:
        """Decode replies to several conversations in one batch."""
        params.check()
        prompts = [self.encode(m, **encode_kwargs) for m in conversations]
        ids: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)  # end of turn or a stop string
        for step_tokens in self.token_stream(prompts, params):
            for b, tok in enumerate(step_tokens):
                if finished[b]:
                    continue
                if tok is None:
                    finished[b] = True
                    continue
                ids[b].append(tok)
                if params.stop:
                    text = self.tokenizer.decode(ids[b], skip_special_tokens=True)
                    finished[b] = any(s in text for s in params.stop)
            if all(finished):
                break
        return [
            Reply(
                self._cut(self.tokenizer.decode(i, skip_special_tokens=True), params.stop),
                len(p.input_ids),
                len(i),
                "stop" if done else "length",
            )
            for p, i, done in zip(prompts, ids, finished, strict=True)
        ]

    def stream(self, messages: list[dict], params: Sampling, **encode_kwargs: Any) -> Iterator[str]:
        """Yield the reply in pieces as it is decoded (a piece never splits a character)."""
        params.check()
        prompt = self.encode(messages, **encode_kwargs)
        ids: list[int] = []
        sent = text = ""
        for (tok,) in self.token_stream([prompt], params):
            if tok is None:
                break
            ids.append(tok)
            raw = self.tokenizer.decode(ids, skip_special_tokens=True)
            text = self._cut(raw, params.stop)
            if not text.endswith("\ufffd") and len(text) > len(sent):  # hold back a half-decoded character
                yield text[len(sent) :]
                sent = text
            if params.stop and text != raw:
                break
        if len(text) > len(sent):
            yield text[len(sent) :]

    @staticmethod
    def _cut(text: str, stop: list[str]) -> str:
        for s in stop:
            if s in text:
                text = text[: text.index(s)]
        return text
