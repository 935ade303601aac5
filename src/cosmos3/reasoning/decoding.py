"""Decoding on the understanding pathway: prompts in, tokens out.

A batch of prompts is left-padded and prefilled into a KV cache, then decoded one token per row per step with a
static-shape step (`Cosmos3Transformer.decode_step`), replayed as a CUDA graph on a GPU. Sampling follows the
OpenAI / vLLM settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from cosmos3.errors import RequestError
from cosmos3.model.transformer import Cosmos3Transformer, KVCache
from cosmos3.parallel.offload import OffloadedLayers


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


@torch.inference_mode()
def token_stream(
    model: Cosmos3Transformer, prompts: list[Prompt], params: Sampling, eos_token_ids: list[int]
) -> Iterator[list[int | None]]:
    """Yield one new token per prompt per step (None once a prompt has finished)."""
    device = prompts[0].embeds.device
    batch = Batch.of(prompts)
    rows, width = batch.valid.shape
    cache = KVCache(model.config, rows, width + params.max_tokens, device, model.dtype)
    cos, sin = model.rope(batch.positions)
    mask = batch.attention_mask()
    hidden = model.causal_forward(batch.embeds, cos, sin, cache, attn_mask=mask, deepstack=batch.deepstack)
    logits = model.lm_head(hidden[:, -1]).float()

    # The static-shape step reads its inputs from these buffers, which each step refills in place.
    slots = torch.zeros(rows, width + params.max_tokens, dtype=torch.bool, device=device)
    slots[:, :width] = batch.valid
    step_tokens = torch.zeros(rows, dtype=torch.long, device=device)
    step_positions = torch.zeros(3, rows, 1, dtype=torch.long, device=device)
    write_at = torch.zeros(1, dtype=torch.long, device=device)
    # A CUDA graph replays fixed weight addresses and no collectives: not with offloaded layers or TP all-reduces.
    graph = device.type == "cuda" and model.groups.tp is None and not isinstance(model.layers, OffloadedLayers)
    decode = DecodeStep(lambda: model.decode_step(step_tokens, step_positions, cache, write_at, slots), device, graph)

    generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = [p.input_ids.tolist() for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    next_pos = torch.tensor([p.next_position for p in prompts], device=device)
    done = [False] * rows
    eos = set(eos_token_ids)
    for step in range(params.max_tokens):
        tokens = sample(logits, params, seen, generated, generator)
        out: list[int | None] = []
        for b, tok in enumerate(tokens.tolist()):
            if done[b] or tok in eos:
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
        step_positions.copy_((next_pos + step).view(1, rows, 1).expand(3, -1, -1))
        write_at.fill_(width + step)
        slots[:, width + step] = True
        logits = decode()


def sample(
    logits: torch.Tensor,
    params: Sampling,
    seen: list[list[int]],
    generated: list[list[int]],
    generator: torch.Generator,
) -> torch.Tensor:
    """One token per row of `[B, vocab]` logits: penalties, then greedy or temperature / top-k / top-p sampling."""
    logits = logits.clone()
    for b in range(logits.shape[0]):
        if params.repetition_penalty != 1.0 and seen[b]:
            idx = torch.tensor(sorted(set(seen[b])), device=logits.device)
            score, penalty = logits[b, idx], params.repetition_penalty
            logits[b, idx] = torch.where(score < 0, score * penalty, score / penalty)
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
