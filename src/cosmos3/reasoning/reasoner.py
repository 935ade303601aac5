"""The Reasoner: text from text, images and video, decoded on the understanding pathway the Generator also uses.

Pre-processing is transformers' Qwen3-VL processor and the vision tower is transformers' Qwen3-VL vision model (with
the checkpoint's vision weights); messages and media are read by `messages`, decoding is `decoding`; position
ids and DeepStack injection are here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosmos3.errors import RequestError
from cosmos3.media import fetch_bytes
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.reasoning.decoding import Prompt, Sampling, prompt_logits, token_stream
from cosmos3.reasoning.messages import MAX_MEDIA_BYTES, MediaReader, template_messages, video_sampling


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an explicit-reasoning reply: the answer is what follows `</think>`."""
    if "</think>" not in text:
        return "", text.strip()
    thought, answer = text.split("</think>", 1)
    answer = answer.strip()
    if answer.startswith("<answer>"):
        answer = answer[len("<answer>") :].split("</answer>", 1)[0].strip()
    return thought.replace("<think>", "").strip(), answer


def rope_positions(token_types: list[int], grids: dict[int, list], merge: int) -> torch.Tensor:
    """Qwen3-VL mRoPE ids `[3, L]`: text runs count up on all rows; a vision grid starting at p gets t = p,
    h = p + row, w = p + col (in units of `merge` patches) and advances p by max(rows, cols)."""
    iters = {k: iter(v) for k, v in grids.items()}
    pieces, pos = [], 0
    for kind, group in itertools.groupby(token_types):
        n = len(list(group))
        if kind == 0:
            pieces.append(torch.arange(pos, pos + n).expand(3, -1))
            pos += n
            continue
        thw = next(iters[kind])
        t, h, w = int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h) + pos, torch.arange(w) + pos, indexing="ij")
        pieces.append(torch.stack([tt + pos, hh, ww]).reshape(3, -1))
        pos += max(h, w)
    return torch.cat(pieces, dim=1)


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
        self.allow_private: bool | None = None  # URLs to private addresses: None follows fetch_bytes' rule

    @property
    def device(self) -> torch.device:
        return self.transformer.embed_tokens.weight.device

    # ------------------------------------------------------------------------------------------- prompts
    @torch.inference_mode()
    def encode(
        self,
        messages: list[dict],
        reasoning: bool = False,
        video_fps: float | None = None,
        video_num_frames: int | None = None,
    ) -> Prompt:
        """Messages -> a prompt for decoding: chat template, media through the processor and vision tower.

        `video_fps` / `video_num_frames` choose how the processor samples video frames (at most one)."""
        sampling = video_sampling(video_fps, video_num_frames)
        media = None
        if self.vision is not None and self.processor is not None:
            media = MediaReader(self._fetch, sampling.get("num_frames"))
        template, images, videos = template_messages(messages, reasoning, media)
        chat = self.processor if self.processor is not None else self.tokenizer
        text = chat.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
        if not images and not videos:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            return self._text_prompt(ids.to(self.device))
        return self._vision_prompt(text, images, videos, sampling)

    def _fetch(self, url: str, field: str) -> bytes:
        return fetch_bytes(
            url,
            field,
            self.allowed_media_dir,
            self.allow_local,
            max_bytes=MAX_MEDIA_BYTES,
            allow_private=self.allow_private,
        )

    def _text_prompt(self, ids: torch.Tensor) -> Prompt:
        positions = torch.arange(len(ids), device=self.device).expand(3, -1)
        return Prompt(ids, positions, self.transformer.embed_tokens(ids))

    def _vision_prompt(self, text: str, images: list, videos: list, sampling: dict[str, Any]) -> Prompt:
        from transformers.video_utils import VideoMetadata

        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [frames for frames, _ in videos]
            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(f), fps=fps) for f, fps in videos]
            # The checkpoint's setting; unset means transformers' current (uncapped) behaviour, stated to silence
            # its warning.
            kwargs["cap_pixels_per_frame"] = bool(
                getattr(self.processor.video_processor, "cap_pixels_per_frame", False)
            )
            kwargs.update(sampling)
        try:
            batch = self.processor(text=[text], **kwargs)
        except ValueError as exc:
            raise RequestError(
                "messages", "<media>", "images and videos the Qwen3-VL processor accepts", str(exc)
            ) from exc
        ids = batch["input_ids"][0].to(self.device)
        types = batch["mm_token_type_ids"][0].tolist()
        grids = {1: list(batch.get("image_grid_thw", [])), 2: []}
        for thw in batch.get("video_grid_thw", []):  # one grid per temporal patch (frames carry timestamps)
            grids[2].extend([torch.tensor([1, thw[1], thw[2]])] * int(thw[0]))
        positions = rope_positions(types, grids, self.merge).to(self.device)

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

    # ------------------------------------------------------------------------------------------- text
    def logits(self, messages: list[dict], **encode_kwargs: Any) -> torch.Tensor:
        """Next-token logits at every position of the templated prompt, `[L, vocab]` fp32 (for scoring and tests)."""
        return prompt_logits(self.transformer, self.encode(messages, **encode_kwargs))

    def complete(self, conversations: list[list[dict]], params: Sampling, **encode_kwargs: Any) -> list[Reply]:
        """Decode replies to several conversations in one batch."""
        params.check()
        prompts = [self.encode(m, **encode_kwargs) for m in conversations]
        ids: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)  # end of turn or a stop string
        for step_tokens in token_stream(self.transformer, prompts, params, self.eos_token_ids):
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
        for (tok,) in token_stream(self.transformer, [prompt], params, self.eos_token_ids):
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
