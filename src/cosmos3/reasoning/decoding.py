"""Decoding on the understanding pathway: prompts in, tokens out.

The pieces both decode paths share: sampling settings (OpenAI / vLLM), the batched `Sampler` (each row with its
own settings and generator), prompts and their prefill (whole or in chunks). The Reasoner decodes through the
continuous-batching `scheduler`; `token_stream` is the plain static batch (prompts left-padded and prefilled into
one KV cache, then one token per row per step, its step replayed as a CUDA graph on a GPU), kept as the
reference the scheduler is tested against.
"""

from __future__ import annotations

import math
import threading
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
# Stop strings are matched on every decode step of every row of the shared batch (on the thread that drives the
# GPU), so one request's stops slow every other request's steps (a probe's 100,000 stops made a step of the whole
# batch ~90 ms). OpenAI takes 4 stop strings and TGI 4 by default (`--max-stop-sequences`); vLLM has no cap. 16
# strings of 256 characters are well past any real use, and add a few microseconds a token to a row (measured on
# `Choice.push`, whose search covers only the new text and the held-back tail: up to 2 x 256 characters a stop).
MAX_STOPS = 16
MAX_STOP_CHARS = 256
STOP_ALLOWED = f"a non-empty string, or a list of at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters"


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
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise RequestError("stop", self.stop, STOP_ALLOWED)
        if len(stops) > MAX_STOPS:
            raise RequestError("stop", self.stop, STOP_ALLOWED, f"has {len(stops)} strings")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise RequestError("stop", longest, STOP_ALLOWED, f"is {len(longest)} characters long")
        self.stop = stops
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


def grammar_field(response_format: Any) -> str:
    """The request field a grammar's errors name: a json_schema's schema, else response_format."""
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return "response_format.json_schema.schema"
    return "response_format"


def grammar_value(response_format: Any) -> Any:
    """What that field holds (RequestError abbreviates it)."""
    if grammar_field(response_format) == "response_format":
        return response_format
    return response_format["json_schema"].get("schema", {})


def guidance_limits():
    """llguidance's default limits, with short errors: its verbose ones hold the parser's state and the whole
    grammar, which put a 1 MB schema in every failed request's error and in the server's log."""
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)


def grammar_error(response_format: Any, matcher: Any) -> RequestError:
    """A matcher's failure as the request's error: a grammar that llguidance validated but cannot step, e.g. a
    regex or const too large for its lexer ("too many expressions constructed"), or a parser item limit."""
    reason = matcher.get_error().split("\n", 1)[0] or matcher.stop_reason()
    return RequestError(
        grammar_field(response_format),
        grammar_value(response_format),
        "a JSON schema that llguidance can enforce within its lexer and parser limits",
        f"cannot be enforced ({reason})",
    )


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


def prefill(model: Cosmos3Transformer, prompt: Prompt, cache: KVCache, end: int) -> torch.Tensor:
    """Prompt tokens `[cache.length, end)` through the model into `cache` (batch 1); returns their final hidden
    states `[1, n, H]`. They attend to the cached earlier tokens and causally among themselves, and get the
    DeepStack features of their own visual tokens, so that a prompt prefilled in chunks equals one pass."""
    start = cache.length
    device = prompt.embeds.device
    cos, sin = model.rope(prompt.positions[:, None, start:end])
    mask = None
    if start:  # causal, aligned to the bottom right: query i sees the `start` cached tokens and itself
        mask = torch.ones(end - start, end, dtype=torch.bool, device=device).tril(start)[None, None]
    deepstack = None
    if prompt.deepstack:
        visual = prompt.visual_mask[start:end]
        first, count = int(prompt.visual_mask[:start].sum()), int(visual.sum())
        if count:  # the features are laid out over the prompt's visual tokens in order
            deepstack = (visual[None], [f[first : first + count] for f in prompt.deepstack])
    return model.causal_forward(prompt.embeds[None, start:end], cos, sin, cache, attn_mask=mask, deepstack=deepstack)


@torch.inference_mode()
def prompt_logits(model: Cosmos3Transformer, prompt: Prompt) -> torch.Tensor:
    """Next-token logits at every position of one prompt, `[L, vocab]` fp32 (for scoring and tests)."""
    length = len(prompt.input_ids)
    cache = KVCache(model.config, 1, length, prompt.embeds.device, model.dtype)
    return model.lm_head(prefill(model, prompt, cache, length)[0]).float()


def graphable(model: Cosmos3Transformer, device: torch.device) -> bool:
    """Whether a decode step can be a CUDA graph: it replays fixed weight addresses and no collectives, so not
    with layers streamed from the host or tensor-parallel all-reduces."""
    return device.type == "cuda" and model.groups.tp is None and not isinstance(model.layers, OffloadedLayers)


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
    cancelled: threading.Event | None = None  # set by another thread (a client gone): the row ends at the next step
    # Why the row failed (the scheduler sets it before the row's last item): kept on the row, which its consumer made,
    # so that the consumer can read it however soon after submitting the row ends.
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        if self.finish_reason is None and self.cancelled is not None and self.cancelled.is_set():
            self.finish_reason = "stop"
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
    run = lambda: model.decode_step(step_tokens, step_positions, cache, write_at, slots)
    decode = DecodeStep(run, device, graphable(model, device))

    sampler = Sampler(size, logits.shape[-1], device)
    for b, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        sampler.start(b, params, row, prompt.input_ids)
    next_pos = torch.tensor([p.next_position for p in prompts], device=device)
    eos = set(eos_token_ids)
    for step in range(params.max_tokens):
        tokens = sampler.tokens(sampler(logits).to("cpu"), range(size))
        out: list[Token | None] = []
        for row, token in zip(rows, tokens, strict=True):
            if not row.done and row.matcher is not None and row.matcher.is_error():  # its failed mask allowed EOS
                raise grammar_error(params.response_format, row.matcher)
            if row.done or token.id in eos:
                row.finish_reason = row.finish_reason or "stop"
                out.append(None)
                continue
            if row.matcher is not None:
                if not row.matcher.consume_token(token.id):  # as the scheduler: the request's error, not a 500
                    raise grammar_error(params.response_format, row.matcher)
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


@dataclass
class Draw:
    """One step's tokens for every row of a batch, on the device: ids `[B]`, and with logprobs the chosen
    tokens' `[B]` and the most likely alternatives' ids and values `[B, k]` (k = the most any row asked for)."""

    ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Draw:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return Draw(move(self.ids), move(self.logprobs), move(self.top_ids), move(self.top_logprobs))


class Sampler:
    """One token per row of `[B, vocab]` logits, each row with its own settings, generator and grammar: penalties
    (repetition over prompt and reply, presence and frequency over the reply), the grammar's mask, then greedy or
    temperature / top-k / top-p sampling, all rows in the same few kernels. Every step is elementwise or a
    reduction along one row, and each setting a row does not use leaves it exactly as it is, so a row's tokens do
    not depend on the rows it shares the batch with.

    A sampled row draws from its own generator with `torch.multinomial`'s own method for one sample (argmax of
    probabilities over Exp(1) noise, aten's Distributions.cpp), the noise drawn per row into that row: the same
    tokens as `torch.multinomial(probs[b:b+1], 1, generator=g)`, without its per-call host syncs.
    Rows are slots: `start` gives one a new sequence."""

    def __init__(self, rows: int, vocab: int, device: torch.device | str):
        self.vocab, self.device = vocab, torch.device(device)
        self.params: list[Sampling | None] = [None] * rows
        self.rows: list[Row | None] = [None] * rows
        self.generators: list[torch.Generator | None] = [None] * rows
        f32 = {"dtype": torch.float32, "device": self.device}
        self.temperature = torch.ones(rows, **f32)  # 1 at greedy rows, whose division is never used
        self.top_k = torch.zeros(rows, dtype=torch.long, device=self.device)  # 0: off
        self.top_p = torch.ones(rows, **f32)
        self.repetition = torch.ones(rows, **f32)
        self.presence = torch.zeros(rows, **f32)
        self.frequency = torch.zeros(rows, **f32)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=self.device)
        self.index = torch.arange(rows, device=self.device)
        self.noise: torch.Tensor | None = None  # [rows, vocab] Exp(1) draws; made when a row first samples
        self.counts: torch.Tensor | None = None  # [rows, vocab] reply token counts (presence / frequency)
        self.seen: torch.Tensor | None = None  # [rows, vocab] prompt and reply tokens (repetition)
        self.bitmask: torch.Tensor | None = None  # [rows, words] llguidance's allowed-token bits, on the host

    def start(self, slot: int, params: Sampling, row: Row, prompt_ids: torch.Tensor) -> None:
        """Row `slot` begins a sequence with these settings after the prompt `prompt_ids`."""
        self.params[slot], self.rows[slot] = params, row
        greedy = params.temperature == 0
        self.generators[slot] = None if greedy else torch.Generator(device=self.device).manual_seed(row.seed)
        self.greedy[slot] = greedy
        self.temperature[slot] = 1.0 if greedy else params.temperature
        self.top_k[slot] = min(params.top_k, self.vocab)
        self.top_p[slot] = params.top_p
        self.repetition[slot] = params.repetition_penalty
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        if params.presence_penalty or params.frequency_penalty or self.counts is not None:
            self.counts = self._table(self.counts, torch.float32)
            self.counts[slot] = 0
        if params.repetition_penalty != 1.0 or self.seen is not None:
            self.seen = self._table(self.seen, torch.bool)
            self.seen[slot] = False
            self.seen[slot, prompt_ids.to(self.device)] = True
        if row.matcher is not None and self.bitmask is None:
            self.bitmask = torch.full((len(self.rows), (self.vocab + 31) // 32), -1, dtype=torch.int32)
            self.bits = torch.arange(32, dtype=torch.int32, device=self.device)

    def _table(self, table: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return table if table is not None else torch.zeros(len(self.rows), self.vocab, dtype=dtype, device=self.device)

    def __call__(self, logits: torch.Tensor, active: list[int] | None = None) -> Draw:
        """Tokens for rows `[0, B)` of `logits` `[B, vocab]` (fp32); `active` (default all) are the rows whose
        sequences are going: only they draw from their generators. Other rows get tokens of no meaning."""
        size = logits.shape[0]
        active = list(range(size)) if active is None else active
        params = [self.params[b] for b in active]
        x = logits
        if self.seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            penalty = self.repetition[:size, None]
            x = torch.where(self.seen[:size], torch.where(x < 0, x * penalty, x / penalty), x)
        if self.counts is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self.counts[:size]
            x = x - (self.presence[:size, None] * (counts > 0) + self.frequency[:size, None] * counts)
        if self.bitmask is not None and any(self.rows[b].matcher is not None for b in active):
            x = x.masked_fill(~self.allowed(size, active), float("-inf"))
        sampled = [b for b in active if self.generators[b] is not None]
        if not sampled:
            ids = x.argmax(dim=-1)
        else:
            ids = self.draw(x, sampled)
            if len(sampled) < len(active):
                ids = torch.where(self.greedy[:size], x.argmax(dim=-1), ids)
        if self.counts is not None:
            self.counts[self.index[:size], ids] += 1
        if self.seen is not None:
            self.seen[self.index[:size], ids] = True
        if not any(p.logprobs for p in params):
            return Draw(ids)
        logprobs = logits.log_softmax(dim=-1)  # the model's own, before penalties, temperature and grammar
        chosen = logprobs.gather(1, ids[:, None])[:, 0]
        most = max(p.top_logprobs for p in params)
        if not most:
            return Draw(ids, chosen)
        top = logprobs.topk(most, dim=-1)
        return Draw(ids, chosen, top.indices, top.values)

    def draw(self, x: torch.Tensor, sampled: list[int]) -> torch.Tensor:
        """Temperature, top-k and top-p per row, then one draw per sampled row from its own generator."""
        size = x.shape[0]
        params = [self.params[b] for b in sampled]
        x = x / self.temperature[:size, None]
        most = min(max(p.top_k for p in params), self.vocab)
        if most > 0:
            k = self.top_k[:size, None]
            kth = x.topk(most, dim=-1).values.gather(1, (k - 1).clamp(0, most - 1))  # rows past `most` are unused
            x = x.masked_fill(x < torch.where(k > 0, kth, float("-inf")), float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = self.top_p[:size, None]
            sorted_logits, order = x.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = (probs.cumsum(dim=-1) - probs > top_p) & (top_p < 1.0)  # the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_logits)
        probs = x.softmax(dim=-1)
        if self.noise is None:
            self.noise = torch.ones(len(self.rows), self.vocab, device=self.device)
        for b in sampled:
            self.noise[b : b + 1].exponential_(generator=self.generators[b])
        return (probs / self.noise[:size]).argmax(dim=-1)

    def allowed(self, size: int, active: list[int]) -> torch.Tensor:
        """`[size, vocab]` True where each row's grammar allows the token (rows without a grammar allow all)."""
        self.bitmask[:size].fill_(-1)
        for b in active:
            row = self.rows[b]
            if row.matcher is not None and not row.done:
                row.matcher.unsafe_compute_mask_ptr(self.bitmask[b].data_ptr(), self.bitmask.shape[1] * 4)
        bits = (self.bitmask[:size].to(self.device)[:, :, None] >> self.bits) & 1
        return bits.view(size, -1)[:, : self.vocab].bool()

    def tokens(self, draw: Draw, slots: list[int] | range) -> list[Token]:
        """The tokens of rows `slots` from a draw already on the host."""
        ids = draw.ids.tolist()
        if draw.logprobs is None:
            return [Token(ids[b]) for b in slots]
        chosen = draw.logprobs.tolist()
        top_ids = draw.top_ids.tolist() if draw.top_ids is not None else None
        top_values = draw.top_logprobs.tolist() if draw.top_logprobs is not None else None
        out = []
        for b in slots:
            params = self.params[b]
            if not params.logprobs:
                out.append(Token(ids[b]))
                continue
            most = params.top_logprobs
            top = list(zip(top_ids[b][:most], top_values[b][:most], strict=True)) if most else []
            out.append(Token(ids[b], chosen[b], top))
        return out
