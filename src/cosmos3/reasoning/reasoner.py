"""The Reasoner: text from text, images and video, decoded on the understanding pathway the Generator also uses.

Pre-processing is transformers' Qwen3-VL processor and the vision tower is transformers' Qwen3-VL vision model (with
the checkpoint's vision weights); messages and media are read by `messages`, decoding is `decoding`; position
ids and DeepStack injection are here.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosmos3.errors import RequestError
from cosmos3.media import fetch_bytes
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.reasoning.decoding import (
    Prompt,
    Row,
    Sampling,
    Token,
    grammar_error,
    grammar_field,
    grammar_of,
    grammar_value,
    guidance_limits,
    prompt_logits,
)
from cosmos3.reasoning.messages import (
    MAX_MEDIA_BYTES,
    MediaReader,
    asks_for_reasoning,
    template_messages,
    video_sampling,
)
from cosmos3.reasoning.scheduler import END, MAX_SLOTS, Job, Scheduler


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn, grammar complete or a stop string) or "length"
    logprobs: list[dict] | None = None  # OpenAI's logprobs.content entries, with Sampling.logprobs


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
        # Streamed text decodes every new token twice (`Choice`). A fast tokenizer that cleans up no spaces gives
        # `decode`'s text straight from its Rust backend, without transformers' Python around each call (0.5
        # against 2.4 us a call on the tiny tokenizer, on the thread that drives the GPU).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._backend = backend if backend is not None and cleans is False else None
        self._guidance_tokenizer = None
        self._token_bytes: dict[int, bytes] = {}
        self._scheduler: Scheduler | None = None
        self._scheduler_made = threading.Lock()
        self._tokenizing = threading.Lock()

    @property
    def scheduler(self) -> Scheduler:
        """The continuous-batching scheduler the Python API decodes with (made at first use, kept with its cache
        and CUDA graphs). Without a thread of its own, its steps run in the callers that wait for tokens, so that
        every rank of a parallel layout runs the same steps in the same order."""
        with self._scheduler_made:
            if self._scheduler is None:
                self._scheduler = Scheduler(
                    self.transformer, self.eos_token_ids, slots=MAX_SLOTS, threaded=False, encode=self.embed_many
                )
        self._scheduler.eos = set(self.eos_token_ids)  # a caller may change them (the benchmark decodes past them)
        return self._scheduler

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
        return self.embed(self.tokenize(messages, reasoning, video_fps, video_num_frames))

    def tokenize(
        self,
        messages: list[dict],
        reasoning: bool = False,
        video_fps: float | None = None,
        video_num_frames: int | None = None,
    ) -> Tokenized:
        """The host's part of `encode` (media read and checked, chat template, the Qwen3-VL processor, position
        ids): no GPU work, so that a server need not hold the GPU for it."""
        sampling = video_sampling(video_fps, video_num_frames)
        media = None
        if self.vision is not None and self.processor is not None:
            media = MediaReader(self._fetch, sampling.get("num_frames"))
        template, images, videos = template_messages(messages, reasoning, media)
        chat = self.processor if self.processor is not None else self.tokenizer
        # One call at a time: a fast tokenizer sets its padding and truncation on each call, and two threads doing
        # so at once fail ("Already borrowed", huggingface/tokenizers#537).
        with self._tokenizing:
            text = chat.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
            if not images and not videos:
                ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
                return Tokenized(ids, torch.arange(len(ids)).expand(3, -1))
            return self._process(text, images, videos, sampling)

    def _fetch(self, url: str, field: str) -> bytes:
        return fetch_bytes(
            url,
            field,
            self.allowed_media_dir,
            self.allow_local,
            max_bytes=MAX_MEDIA_BYTES,
            allow_private=self.allow_private,
        )

    def _process(self, text: str, images: list, videos: list, sampling: dict[str, Any]) -> Tokenized:
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
        types = batch["mm_token_type_ids"][0].tolist()
        grids = {1: list(batch.get("image_grid_thw", [])), 2: []}
        for thw in batch.get("video_grid_thw", []):  # one grid per temporal patch (frames carry timestamps)
            grids[2].extend([torch.tensor([1, thw[1], thw[2]])] * int(thw[0]))
        return Tokenized(batch["input_ids"][0], rope_positions(types, grids, self.merge), batch)

    @torch.inference_mode()
    def embed(self, tokenized: Tokenized) -> Prompt:
        """The GPU's part of `encode`: token embeddings, the vision tower's features in place, DeepStack."""
        return self.embed_many([tokenized])[0]

    @torch.inference_mode()
    def embed_many(self, tokenized: list[Tokenized]) -> list[Prompt]:
        """`embed` for several prompts with one vision-tower call per kind of media for all of them: the tower
        attends within each image or temporal patch only, so batching changes no feature, and one call of many
        videos costs a fraction of as many calls of one (one 8-frame video: 46 ms of host work, ~900 kernel
        launches and a host sync per block, for 13 ms of GPU time; 16 in one call: 16 ms each; benchmarks/README.md,
        "Reasoner")."""
        features: list[dict[str, tuple[torch.Tensor, list[torch.Tensor]]]] = [{} for _ in tokenized]
        for pixel_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            have = [i for i, t in enumerate(tokenized) if t.media is not None and pixel_key in t.media]
            if not have:
                continue
            grids = [tokenized[i].media[grid_key] for i in have]
            pixels = torch.cat([tokenized[i].media[pixel_key] for i in have]).to(self.device, self.transformer.dtype)
            out = self.vision(pixels, grid_thw=torch.cat(grids).to(self.device))
            counts = [int(g.prod(-1).sum()) // self.merge**2 for g in grids]  # merged features per prompt
            if sum(counts) != out.pooler_output.shape[0]:
                raise RuntimeError(f"the vision tower made {out.pooler_output.shape[0]} features for {sum(counts)}")
            pooled = out.pooler_output.split(counts)
            stacks = [f.split(counts) for f in out.deepstack_features]
            for j, i in enumerate(have):
                features[i][pixel_key] = (pooled[j], [f[j] for f in stacks])
        return [self._embedded(t, f) for t, f in zip(tokenized, features, strict=True)]

    def _embedded(self, tokenized: Tokenized, features: dict[str, tuple[torch.Tensor, list[torch.Tensor]]]) -> Prompt:
        """A prompt's token embeddings with its vision features (`features[pixel key]` = the tower's merged
        features and DeepStack features of this prompt's images or videos) in place."""
        ids = tokenized.ids.to(self.device)
        positions = tokenized.positions.to(self.device)
        embeds = self.transformer.embed_tokens(ids)
        if tokenized.media is None:
            return Prompt(ids, positions, embeds)
        visual_mask = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
        deepstack: list[torch.Tensor] | None = None
        kinds = (("pixel_values", self.image_token_id), ("pixel_values_videos", self.video_token_id))
        for pixel_key, token_id in kinds:
            if pixel_key not in features:
                continue
            pooled, stack = features[pixel_key]
            mask = ids == token_id
            if int(mask.sum()) != pooled.shape[0]:
                raise RequestError(
                    "messages",
                    "<media>",
                    "one placeholder per vision feature",
                    f"produced {int(mask.sum())} placeholders for {pooled.shape[0]} features",
                )
            embeds = embeds.clone()
            embeds[mask] = pooled.to(embeds.dtype)
            # DeepStack features, laid out over all visual tokens of the sequence (images and videos together).
            if deepstack is None:
                deepstack = [embeds.new_zeros(0, embeds.shape[-1])] * len(stack)
            joint_mask = visual_mask | mask
            merged = []
            for prev, feat in zip(deepstack, stack, strict=True):
                joint = feat.new_zeros(int(joint_mask.sum()), feat.shape[-1])
                joint[mask[joint_mask]] = feat
                joint[visual_mask[joint_mask]] = prev.to(feat.dtype)
                merged.append(joint)
            deepstack, visual_mask = merged, joint_mask
        return Prompt(ids, positions, embeds, visual_mask, deepstack)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Decode a few tokens of a short prompt at one row and at two (a scheduler of its own, end of turn
        ignored), so that the decode step's compiled regions (`compile_decode_layers`: one row, then any number of
        rows) are compiled before a first request waits for them. A server calls it at startup."""
        prompt = self.encode([{"role": "user", "content": "Describe the scene."}])
        scheduler = Scheduler(self.transformer, [], slots=2, threaded=False)
        for rows in (1, 2):
            out: queue.Queue = queue.Queue()
            params = Sampling(max_tokens=3, temperature=0, presence_penalty=0).check()
            for i in range(rows):
                scheduler.submit(prompt, params, Row(0), out, i)
            finished = 0
            while finished < rows:
                finished += scheduler.next(out)[1] is END
        scheduler.release()

    # ------------------------------------------------------------------------------------------- text
    def logits(self, messages: list[dict], **encode_kwargs: Any) -> torch.Tensor:
        """Next-token logits at every position of the templated prompt, `[L, vocab]` fp32 (for scoring and tests)."""
        return prompt_logits(self.transformer, self.encode(messages, **encode_kwargs))

    def complete(self, conversations: list[list[dict]], params: Sampling, **encode_kwargs: Any) -> list[Reply]:
        """Decode replies to several conversations in one batch: `params.n` choices each, conversation-major."""
        return replies(self.deltas(conversations, params, **encode_kwargs))

    def stream(self, messages: list[dict], params: Sampling, **encode_kwargs: Any) -> Iterator[str]:
        """Yield the reply (the first choice) in pieces as it is decoded (a piece never splits a character)."""
        for delta in self.deltas([messages], params, **encode_kwargs):
            if delta.index == 0 and delta.text:
                yield delta.text

    def deltas(self, conversations: list[list[dict]], params: Sampling, **encode_kwargs: Any) -> Iterator[Delta]:
        """Decode `params.n` choices per conversation through the continuous-batching scheduler (the server's
        decode path), yielding each choice's text as it grows.

        Unset sampling fields take the documents' settings, with reasoning when `reasoning=True` or when every
        conversation's last user turn asks for the <think> format. A choice's last delta has its finish_reason
        and token counts."""
        return self.decode_scheduled(self.prepare(conversations, params, **encode_kwargs), self.scheduler)

    def prepare(
        self,
        conversations: list[list[dict]],
        params: Sampling,
        cancelled: threading.Event | None = None,
        **encode_kwargs: Any,
    ) -> Decode:
        """Settings resolved and checked, the grammar checked, conversations tokenized (media read, the processor),
        one row per choice: all on the host. The prompts are embedded (the vision tower) by the scheduler that
        decodes them, together with the other prompts waiting for a row. `cancelled`, once set, ends every row."""
        return self.decode_of(self.read(conversations, params, **encode_kwargs), cancelled)

    def read(self, conversations: list[list[dict]], params: Sampling, **encode_kwargs: Any) -> Request:
        """Settings resolved and checked, the grammar checked, conversations tokenized: no GPU work."""
        reasoning = bool(encode_kwargs.get("reasoning")) or all(asks_for_reasoning(m) for m in conversations)
        params = params.resolved(reasoning).check()
        grammar = self.grammar(params.response_format)
        if grammar is not None:
            self.first_steps(grammar, params.response_format)
        if params.logprobs:  # the token bytes' table, made once here rather than by the first token's logprobs
            _ = self.guidance_tokenizer  # (the server turns tokens into text on the thread that drives the GPU)
        return Request(params, grammar, [self.tokenize(m, **encode_kwargs) for m in conversations])

    def decode_of(self, request: Request, cancelled: threading.Event | None = None) -> Decode:
        """One row per choice of a read request (its prompts still to embed: the scheduler's `encode` does it)."""
        params, grammar = request.params, request.grammar
        prompts = request.conversations
        rows = [
            Row(
                (params.seed + i) % 2**63,
                self.matcher(grammar, params.response_format) if grammar else None,
                cancelled=cancelled,
            )
            for _ in prompts
            for i in range(params.n)
        ]
        choices = [Choice(self, params, len(p.input_ids)) for p in prompts for _ in range(params.n)]
        return Decode(params, [p for p in prompts for _ in range(params.n)], rows, choices)

    def decode_scheduled(self, decode: Decode, scheduler: Scheduler) -> Iterator[Delta]:
        """Every row of `decode` as jobs of a continuous-batching `scheduler` (other requests join and leave the
        same batch). Closing the iterator early cancels the rows still running."""
        out: queue.Queue = queue.Queue()
        deltas = Deltas(decode)
        jobs = self.submit_scheduled(decode, scheduler, out)
        try:
            while not deltas.done:
                delta = deltas.of(*scheduler.next(out))
                if delta is not None:
                    yield delta
        finally:
            for job in jobs:
                job.cancel()

    def submit_scheduled(self, decode: Decode, scheduler: Scheduler, out: queue.Queue | Any) -> list[Job]:
        """Every row of `decode` as jobs of `scheduler`, their items going to `out` (see `Job`): a caller that
        pushes them on (the server) turns them into deltas with a `Deltas(decode)`, as `decode_scheduled` does."""
        return [
            scheduler.submit(prompt, decode.params, row, out, index)
            for index, (prompt, row) in enumerate(zip(decode.prompts, decode.rows, strict=True))
        ]

    # ------------------------------------------------------------------------------------ structured outputs
    @property
    def guidance_tokenizer(self):
        """llguidance's view of the tokenizer (built once): token bytes, and the end-of-turn tokens it may allow."""
        if self._guidance_tokenizer is None:
            import llguidance.hf

            try:
                self._guidance_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.transformer.config.vocab_size, eos_token=self.eos_token_ids
                )
            except ValueError as exc:
                raise RequestError(
                    "response_format", "json", "a checkpoint with a fast (tokenizers) tokenizer", str(exc)
                ) from exc
        return self._guidance_tokenizer

    def grammar(self, response_format: dict | None) -> str | None:
        """The request's grammar, checked against this tokenizer (a schema llguidance cannot enforce is named)."""
        try:
            grammar = grammar_of(response_format)
        except ValueError as exc:  # llguidance's own schema errors
            raise RequestError("response_format.json_schema.schema", "<schema>", "a JSON schema", str(exc)) from exc
        if grammar is None:
            return None
        from llguidance import LLMatcher  # only for a constrained request

        error = LLMatcher.validate_grammar(grammar, self.guidance_tokenizer, limits=guidance_limits())
        if error:
            field = grammar_field(response_format)
            raise RequestError(field, "<schema>", "a JSON schema that llguidance can enforce", error)
        return grammar

    def first_steps(self, grammar: str, response_format: dict) -> None:
        """Step a matcher of a validated grammar as decoding will: its first token mask, then every token the
        grammar forces from there. llguidance builds a lexeme's regex only when decoding reaches it, so a schema
        that it validates can still fail at the first token (`"pattern": "^a{1000000}$"`, a 1 MB `const`: "too many
        expressions constructed"), or allow no token at all (`{"$ref": "#"}`: a cycle with no base case admits no
        finite JSON value). Both are the request's errors here, before its rows join the batch. Bounded by
        llguidance's own limits (a forced path ends at its fuel and item limits), on the host."""
        matcher = self.matcher(grammar, response_format)
        mask = torch.empty((self.guidance_tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if matcher.is_error() and matcher.get_error().startswith("NoExtension"):  # not even a first byte
            raise RequestError(
                grammar_field(response_format),
                grammar_value(response_format),
                "a satisfiable JSON schema (a $ref cycle needs a base case, e.g. an anyOf branch without it)",
                "is unsatisfiable: no finite JSON value matches it",
            )
        if not matcher.is_error():
            matcher.consume_tokens(matcher.compute_ff_tokens())
        if matcher.is_error():
            raise grammar_error(response_format, matcher)

    def matcher(self, grammar: str, response_format: dict | None = None):
        from llguidance import LLMatcher

        matcher = LLMatcher(self.guidance_tokenizer, grammar, log_level=0, limits=guidance_limits())
        if matcher.is_error():
            raise grammar_error(response_format, matcher)
        return matcher

    def token_bytes(self, token: int) -> bytes:
        if token not in self._token_bytes:
            tok = self.guidance_tokenizer
            special = tok.is_special_token(token)
            self._token_bytes[token] = self.tokenizer.decode([token]).encode() if special else tok.decode_bytes([token])
        return self._token_bytes[token]

    def detokenize(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=True)`, in the tokenizer's backend where that is the same."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logprob_entry(self, token: int, logprob: float) -> dict:
        raw = self.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


@dataclass
class Tokenized:
    """A conversation read and tokenized on the host (`Reasoner.tokenize`): ids `[L]`, mRoPE position ids
    `[3, L]`, and with images or videos the processor's output (pixels and grids)."""

    ids: torch.Tensor
    positions: torch.Tensor
    media: Any = None

    @property
    def input_ids(self) -> torch.Tensor:  # as a Prompt names them: the scheduler reads either
        return self.ids

    @property
    def patches(self) -> int:
        """Vision patches the tower will read for this prompt (its share of a batched encode)."""
        if self.media is None:
            return 0
        return sum(int(self.media[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in self.media)


@dataclass
class Request:
    """A request read on the host (`Reasoner.read`): resolved settings, its grammar, its tokenized conversations."""

    params: Sampling
    grammar: str | None
    conversations: list[Tokenized]


@dataclass
class Decode:
    """A request ready to decode: its resolved settings and, per choice, a prompt, a row and a text builder."""

    params: Sampling
    prompts: list[Prompt | Tokenized]  # a conversation's n choices share one (embedded once)
    rows: list[Row]
    choices: list[Choice]


def replies(deltas: Iterable[Delta]) -> list[Reply]:
    """The replies the deltas of a decode add up to, in choice order."""
    out: dict[int, Reply] = {}
    texts: dict[int, list[str]] = {}
    for delta in deltas:
        texts.setdefault(delta.index, []).append(delta.text)
        reply = out.setdefault(delta.index, Reply("", 0, 0, "", [] if delta.logprobs is not None else None))
        if delta.logprobs is not None:
            reply.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            reply.finish_reason = delta.finish_reason
            reply.prompt_tokens, reply.completion_tokens = delta.prompt_tokens, delta.completion_tokens
    for index, reply in out.items():
        reply.text = "".join(texts[index])
    return [out[i] for i in sorted(out)]


class Deltas:
    """One decode's scheduler items, `(index, Token)` and `(index, END)`, as the deltas of its choices: the one
    place where tokens become text (`Choice`: incremental detokenization, stop strings, logprobs) and a choice's
    last delta gets its finish_reason and token counts. A stop string ends the row (the scheduler gives it back at
    its next step). Call `of` from one thread at a time, in the order the items came."""

    def __init__(self, decode: Decode):
        self.decode = decode
        self.running = len(decode.rows)

    @property
    def done(self) -> bool:
        """Every row has ended (its END item was read)."""
        return self.running == 0

    def of(self, index: int, item: Token | object) -> Delta | None:
        """The delta an item makes, if any; a failed row's END raises its error."""
        row, choice = self.decode.rows[index], self.decode.choices[index]
        if item is END:
            self.running -= 1
            if row.error is not None:
                raise row.error
            return choice.last_delta(index, row.finish_reason or "length")
        if choice.stopped:  # tokens decoded before the scheduler saw the stop string
            return None
        delta = choice.push(item)
        if choice.stopped:
            row.finish_reason = "stop"  # the scheduler gives the row back at its next step
        return Delta(index, *delta) if delta is not None else None


@dataclass
class Delta:
    """A piece of one choice's reply: its text, the logprobs of the tokens that made it (OpenAI's
    `logprobs.content` entries, with logprobs), and on the choice's last delta its finish_reason and token counts."""

    index: int
    text: str = ""
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Choice:
    """One choice's text as its tokens arrive: incremental detokenization (a piece never splits a character),
    stop strings cut (text that could still become a stop string is held back), logprobs kept with their text."""

    def __init__(self, reasoner: Reasoner, params: Sampling, prompt_tokens: int):
        self.reasoner, self.params, self.prompt_tokens = reasoner, params, prompt_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # vLLM's incremental detokenization offsets
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text already given out
        self.pending: list[dict] | None = [] if params.logprobs else None
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.stopped = self.finished = False

    def decode(self, ids: list[int]) -> str:
        return self.reasoner.detokenize(ids)

    def push(self, token: Token) -> tuple[str, list[dict] | None] | None:
        self.ids.append(token.id)
        if self.pending is not None:
            entry = self.reasoner.logprob_entry(token.id, token.logprob)
            entry["top_logprobs"] = [self.reasoner.logprob_entry(t, lp) for t, lp in token.top or []]
            self.pending.append(entry)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        for stop in self.params.stop:
            # From just before the text not yet given out (at most `hold` characters and this step's): a stop found
            # earlier would have ended the choice, so a step searches its new text, not the whole reply.
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self.take(len(self.text) if self.stopped else len(self.text) - self.hold)

    def take(self, end: int) -> tuple[str, list[dict] | None] | None:
        if end <= self.sent:
            return None
        piece, self.sent = self.text[self.sent : end], end
        logprobs, self.pending = self.pending, [] if self.pending is not None else None
        return piece, logprobs

    def last_delta(self, index: int, finish_reason: str) -> Delta:
        return Delta(index, *self.finish(), finish_reason, self.prompt_tokens, len(self.ids))

    def finish(self) -> tuple[str, list[dict] | None]:
        """The rest of the text (a trailing partial character too) and logprobs."""
        if not self.stopped:
            rest = self.decode(self.ids[self.prefix :])[len(self.decode(self.ids[self.prefix : self.read])) :]
            self.text += rest
            for stop in self.params.stop:
                at = self.text.find(stop, max(0, self.sent - len(stop)))
                if at >= 0:
                    self.text = self.text[:at]
        self.finished = True
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        logprobs, self.pending = self.pending, [] if self.pending is not None else None
        return piece, logprobs
