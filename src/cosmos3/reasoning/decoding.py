"""Decoding on the understanding pathway: prompts in, tokens out.

A batch of prompts is left-padded and prefilled into a KV cache, then decoded one token per row per step with a
static-shape step (`Cosmos3Transformer.decode_step`), replayed as a CUDA graph on a GPU. Sampling follows the
OpenAI / vLLM settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cosmos3.errors import RequestError
from cosmos3.model.transformer import Cosmos3Transformer, KVCache
from cosmos3.parallel.offload import OffloadedLayers

# The documents' Reasoner sampling settings (seed 001: "Reasoner examples use the following sampling settings"),
# without and with explicit reasoning: what a request that leaves a field unset gets.
DEFAULTS = {
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0, "presence_penalty": 1.5},
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.0, "presence_penalty": 0.0},
}
MAX_N = 16  # choices per request (each is a row of the batch)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass
class Sampling:
    """Decoding settings (OpenAI / vLLM names). temperature 0 is greedy; None takes the documents' setting
    (`DEFAULTS`, with or without reasoning). `n` choices are decoded as rows of one batch, choice i with seed
    `seed + i`. `logprobs` are the model's own (before penalties, temperature and constraints), as vLLM reports
    them. `response_format` is OpenAI's: text, json_object or json_schema, enforced by constrained decoding."""

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict | None = None

    def resolved(self, reasoning: bool = False) -> Sampling:
        """A copy with every unset field at the documents' setting."""
        return replace(self, **{k: v for k, v in DEFAULTS[bool(reasoning)].items() if getattr(self, k) is None})

    def check(self) -> Sampling:
        def number(name, lo, hi, integer=False):
            value = getattr(self, name)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value) or not lo <= value <= hi:
                raise RequestError(name, value, f"{'an integer' if integer else 'a number'} from {lo} to {hi}")

        for name, value in DEFAULTS[False].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        number("max_tokens", 1, 131072, integer=True)
        number("temperature", 0.0, 10.0)
        number("top_p", 1e-6, 1.0)
        number("top_k", 0, 1_000_000, integer=True)
        number("repetition_penalty", 1e-3, 10.0)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("seed", 0, 2**63 - 1, integer=True)
        number("n", 1, MAX_N, integer=True)
        number("top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if not isinstance(self.logprobs, bool):
            raise RequestError("logprobs", self.logprobs, "true or false")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs", self.top_logprobs, "0 unless logprobs is true")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop", self.stop, "a non-empty string or a list of them")
        grammar_of(self.response_format)  # the shape; the schema is checked against the tokenizer when compiled
        return self


def grammar_of(response_format: Any) -> str | None:
    """OpenAI's `response_format` as an llguidance grammar (None: free text). Compact JSON (no whitespace between
    tokens), so that a model cannot spend its budget on spaces; a json_schema is enforced as given."""
    if response_format is None:
        return None
    kinds = "{type: text}, {type: json_object} or {type: json_schema, json_schema: {name, schema, strict}}"
    if not isinstance(response_format, dict) or response_format.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise RequestError("response_format", response_format, kinds)
    kind = response_format["type"]
    extra = set(response_format) - {"type", "json_schema"} or (
        kind != "json_schema" and "json_schema" in response_format
    )
    if extra:
        raise RequestError("response_format", response_format, kinds, "has fields its type does not take")
    if kind == "text":
        return None
    from llguidance import LLMatcher

    options = {"whitespace_flexible": False}
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or set(spec) - {"name", "schema", "strict", "description"}:
        raise RequestError("response_format.json_schema", spec, "{name, schema, strict, description}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise RequestError("response_format.json_schema.schema", schema, "a JSON schema object")
    return LLMatcher.grammar_from_json_schema(schema, defaults=options)


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


class DecodeStep:
    """Runs a static-shape decode step eagerly, or on a GPU captures it once in a CUDA graph and replays it: a
    token then costs one launch instead of a few hundred (decoding is bound by launch overhead otherwise)."""

    def __init__(self, step: Callable[[], torch.Tensor], device: torch.device, graph: bool = True):
        self.step = step
        self.use_graph = graph and device.type == "cuda"
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


@torch.inference_mode()
def prompt_logits(model: Cosmos3Transformer, prompt: Prompt) -> torch.Tensor:
    """Next-token logits at every position of one prompt, `[L, vocab]` fp32 (for scoring and tests)."""
    cache = KVCache(model.config, 1, len(prompt.input_ids), prompt.embeds.device, model.dtype)
    cos, sin = model.rope(prompt.positions[:, None])
    deepstack = (prompt.visual_mask[None], prompt.deepstack) if prompt.deepstack else None
    hidden = model.causal_forward(prompt.embeds[None], cos, sin, cache, deepstack=deepstack)
    return model.lm_head(hidden[0]).float()


@dataclass
class Batch:
    """Prompts left-padded to one width, so that every prompt's last token is in the last column."""

    embeds: torch.Tensor  # [B, W, H]
    positions: torch.Tensor  # [3, B, W]
    valid: torch.Tensor  # [B, W] False at padding
    deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None  # (visual mask [B, W], per-layer features)

    @staticmethod
    def of(prompts: list[Prompt]) -> Batch:
        first = prompts[0].embeds
        batch, width = len(prompts), max(len(p.input_ids) for p in prompts)
        embeds = first.new_zeros(batch, width, first.shape[-1])
        positions = torch.zeros(3, batch, width, dtype=torch.long, device=first.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=first.device)
        visual = torch.zeros(batch, width, dtype=torch.bool, device=first.device)
        for b, p in enumerate(prompts):
            start = width - len(p.input_ids)
            embeds[b, start:] = p.embeds
            positions[:, b, start:] = p.positions
            valid[b, start:] = True
            if p.visual_mask is not None:
                visual[b, start:] = p.visual_mask
        deepstack = None
        with_vision = [p for p in prompts if p.deepstack]
        if with_vision:
            layers = len(with_vision[0].deepstack)
            deepstack = (visual, [torch.cat([p.deepstack[i] for p in with_vision]) for i in range(layers)])
        return Batch(embeds, positions, valid, deepstack)

    def attention_mask(self) -> torch.Tensor | None:
        """`[B, 1, W, W]` causal mask over the non-padding tokens; None without padding (plain causal attention).
        Padding rows attend to themselves, so that no row of the softmax is empty."""
        if bool(self.valid.all()):
            return None
        width, device = self.valid.shape[1], self.valid.device
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        return ((causal[None] & self.valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device))[:, None]


@dataclass
class Row:
    """One sequence of a batch: its seed, its grammar (an llguidance matcher, or None) and how it finished.
    A caller that ends a row itself (a stop string) sets `finish_reason`; the decoder then skips it."""

    seed: int = 0
    matcher: Any = None
    finish_reason: str | None = None  # "stop" (end of turn, grammar complete, stop string) or "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Token:
    """A decoded token; with logprobs, its log-probability and the `top` (id, log-probability) alternatives."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@torch.inference_mode()
def token_stream(
    model: Cosmos3Transformer,
    prompts: list[Prompt],
    params: Sampling,
    eos_token_ids: list[int],
    rows: list[Row] | None = None,
) -> Iterator[list[Token | None]]:
    """Yield one new token per row per step (None once a row has finished). Rows that are still going when
    `max_tokens` runs out finish with "length"."""
    params = params.check() if any(getattr(params, k) is None for k in DEFAULTS[False]) else params
    rows = rows if rows is not None else [Row(params.seed) for _ in prompts]
    device = prompts[0].embeds.device
    batch = Batch.of(prompts)
    size, width = batch.valid.shape
    cache = KVCache(model.config, size, width + params.max_tokens, device, model.dtype)
    cos, sin = model.rope(batch.positions)
    mask = batch.attention_mask()
    hidden = model.causal_forward(batch.embeds, cos, sin, cache, attn_mask=mask, deepstack=batch.deepstack)
    logits = model.lm_head(hidden[:, -1]).float()

    # The static-shape step reads its inputs from these buffers, which each step refills in place.
    slots = torch.zeros(size, width + params.max_tokens, dtype=torch.bool, device=device)
    slots[:, :width] = batch.valid
    step_tokens = torch.zeros(size, dtype=torch.long, device=device)
    step_positions = torch.zeros(3, size, 1, dtype=torch.long, device=device)
    write_at = torch.zeros(1, dtype=torch.long, device=device)
    # A CUDA graph replays fixed weight addresses and no collectives: not with offloaded layers or TP all-reduces.
    graph = device.type == "cuda" and model.groups.tp is None and not isinstance(model.layers, OffloadedLayers)
    decode = DecodeStep(lambda: model.decode_step(step_tokens, step_positions, cache, write_at, slots), device, graph)

    sampler = Sampler(params, rows, [p.input_ids for p in prompts], logits.shape[-1], device)
    next_pos = torch.tensor([p.next_position for p in prompts], device=device)
    eos = set(eos_token_ids)
    for step in range(params.max_tokens):
        tokens = sampler(logits)
        out: list[Token | None] = []
        for row, token in zip(rows, tokens, strict=True):
            if row.done or token.id in eos:
                row.finish_reason = row.finish_reason or "stop"
                out.append(None)
                continue
            if row.matcher is not None:
                if not row.matcher.consume_token(token.id):
                    raise RuntimeError(f"the grammar refused a token it allowed: {row.matcher.get_error()}")
                if row.matcher.is_stopped():  # the grammar is complete: nothing may follow
                    row.finish_reason = "stop"
            out.append(token)
        yield out
        if all(row.done for row in rows):
            return
        if step == params.max_tokens - 1:
            for row in rows:
                row.finish_reason = row.finish_reason or "length"
            return
        step_tokens.copy_(torch.tensor([t.id if t is not None else 0 for t in out], device=device))
        step_positions.copy_((next_pos + step).view(1, size, 1).expand(3, -1, -1))
        write_at.fill_(width + step)
        slots[:, width + step] = True
        logits = decode()


class Sampler:
    """One token per row of `[B, vocab]` logits: penalties (repetition over prompt and reply, presence and
    frequency over the reply), the grammar's mask, then greedy or temperature / top-k / top-p sampling from each
    row's own generator (so a row's tokens do not depend on the other rows of its batch)."""

    def __init__(self, params: Sampling, rows: list[Row], prompt_ids: list[torch.Tensor], vocab: int, device):
        self.params, self.rows, self.vocab = params, rows, vocab
        self.generators = [torch.Generator(device=device).manual_seed(row.seed) for row in rows]
        size = len(rows)
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(size, vocab, device=device)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(size, vocab, dtype=torch.bool, device=device)
            for b, ids in enumerate(prompt_ids):
                self.seen[b, ids.to(device)] = True
        self.bitmask = None
        if any(row.matcher is not None for row in rows):
            self.bitmask = torch.full((size, (vocab + 31) // 32), -1, dtype=torch.int32)
            self.bits = torch.arange(32, dtype=torch.int32)

    def __call__(self, logits: torch.Tensor) -> list[Token]:
        params = self.params
        raw, logits = logits, logits.clone()
        if self.seen is not None:
            penalty = params.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        if self.counts is not None:
            logits -= params.presence_penalty * (self.counts > 0) + params.frequency_penalty * self.counts
        if self.bitmask is not None:
            logits = logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))
        if params.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self.draw(logits / params.temperature)
        ids = tokens.tolist()
        rows = torch.arange(len(ids), device=tokens.device)
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if not params.logprobs:
            return [Token(tok) for tok in ids]
        logprobs = raw.float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        top = logprobs.topk(params.top_logprobs, dim=-1) if params.top_logprobs else None
        return [
            Token(
                tok,
                chosen[b],
                list(zip(top.indices[b].tolist(), top.values[b].tolist(), strict=True)) if top is not None else [],
            )
            for b, tok in enumerate(ids)
        ]

    def allowed(self) -> torch.Tensor:
        """`[B, vocab]` True where each row's grammar allows the token (rows without a grammar allow all)."""
        for b, row in enumerate(self.rows):
            if row.matcher is not None and not row.done:
                row.matcher.unsafe_compute_mask_ptr(self.bitmask[b].data_ptr(), self.bitmask.shape[1] * 4)
            else:
                self.bitmask[b].fill_(-1)
        bits = (self.bitmask[:, :, None] >> self.bits) & 1
        return bits.view(len(self.rows), -1)[:, : self.vocab].bool()

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        params = self.params
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
        return torch.cat(
            [torch.multinomial(probs[b : b + 1], 1, generator=g)[0] for b, g in enumerate(self.generators)]
        )
