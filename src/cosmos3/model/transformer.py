"""The Cosmos 3 Mixture-of-Transformers denoiser.

Parameter names are the published checkpoint's flat names, so loading is a plain `load_state_dict`
after the renames in `cosmos3.loading.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cosmos3.config import TransformerConfig
from cosmos3.model.layers import (
    DomainLinear,
    MoTDecoderLayer,
    RMSNorm,
    TimestepEmbedder,
    apply_rope,
    attention,
    rope_cos_sin,
)
from cosmos3.model.sequence import Packed
from cosmos3.parallel.layout import SINGLE, Groups
from cosmos3.parallel.ulysses import SequenceShard

# Where an understanding layer's keys and values go: called with (layer index, rotated keys, values), returns the keys
# and values its queries attend to (a cache stores them and returns what it holds).
KeysValues = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# Generation rows (all branches together) past which forward_gen runs one branch at a time, and the MLP's row
# chunk: 2^15 rows of a Nano-width SwiGLU keep its activations near 2 GiB in bf16 (3 x 32768 x 12288 x 2 bytes), and
# beyond it the GEMMs are large enough that batching branches adds memory, not speed (benchmarks/README.md).
ROWS_PER_CHUNK = 32768


class KVCache:
    """Keys and values of the understanding pathway per layer, `[B, max_len, kv_heads, head_dim]`, filled in order."""

    def __init__(self, cfg: TransformerConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `[B, S, ...]` after the `length` held so far; returns everything held, this included."""
        end = self.length + k.shape[1]
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row at slot `at` (`[1]`, a tensor so that a CUDA graph can replay it at the next
        slot); returns the whole buffers (a mask says which slots count)."""
        self.k[layer].index_copy_(1, at, k)
        self.v[layer].index_copy_(1, at, v)
        return self.k[layer], self.v[layer]


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """`[C, T, h, w]` -> `[T * ceil(h/p) * ceil(w/p), p*p*C]`, zero-padding odd sizes bottom/right.

    Tokens are frame-major, then patch row, then patch column; inside a token the layout is
    (row-in-patch, col-in-patch, channel) with the channel fastest.
    """
    c, t, h, w = latent.shape
    hp, wp = -(-h // p), -(-w // p)
    if (hp * p, wp * p) != (h, w):
        latent = torch.nn.functional.pad(latent, (0, wp * p - w, 0, hp * p - h))
    latent = latent.reshape(c, t, hp, p, wp, p).permute(1, 2, 4, 3, 5, 0)
    return latent.reshape(t * hp * wp, p * p * c)


def unpatchify(tokens: torch.Tensor, t: int, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of `patchify` for `t` frames; crops the padding."""
    hp, wp = -(-h // p), -(-w // p)
    c = tokens.shape[-1] // (p * p)
    latent = tokens.reshape(t, hp, wp, p, p, c).permute(5, 0, 1, 3, 2, 4)
    return latent.reshape(c, t, hp * p, wp * p)[:, :, :h, :w]


class Cosmos3Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, groups: Groups = SINGLE):
        super().__init__()
        self.config = cfg  # with tensor parallelism: this rank's heads and MLP width
        self.groups = groups  # the parallel layout: Ulysses splits the generation rows, TP the heads
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.nemotron_norm)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = norm()
        self.norm_moe_gen = norm()
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.proj_in = nn.Linear(cfg.patch_latent_dim, cfg.hidden_size)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.patch_latent_dim)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size)
        if cfg.sound_gen:
            self.audio_proj_in = nn.Linear(cfg.sound_dim, cfg.hidden_size)
            self.audio_proj_out = nn.Linear(cfg.hidden_size, cfg.sound_dim)
            self.audio_modality_embed = nn.Parameter(torch.zeros(cfg.hidden_size))
        if cfg.action_gen:
            self.action_proj_in = DomainLinear(cfg.action_dim, cfg.hidden_size, cfg.num_embodiment_domains)
            self.action_proj_out = DomainLinear(cfg.hidden_size, cfg.action_dim, cfg.num_embodiment_domains)
            self.action_modality_embed = nn.Parameter(torch.zeros(cfg.hidden_size))

    # The generation layer's two elementwise-heavy regions (before and after attention), torch.compiled by
    # `compile_generation_layers`; plain functions otherwise.
    compiled_gen_in: Callable | None = None
    compiled_gen_out: Callable | None = None
    compile_min_rows = 0  # passes with fewer generation rows run the plain functions
    # Denoising passes of at most this many generation rows (all branches) are replayed from a CUDA graph by the
    # sampler (`cosmos3.generation.pass_graph`); 0: none. Set on one GPU by `cosmos3.engine.speed_up_generation`.
    graph_max_rows = 0
    # The understanding layer's regions around attention in the Reasoner's one-token decode step, torch.compiled by
    # `compile_decode_layers`; plain functions otherwise (prefill and the prompt cache always run them plain).
    compiled_und_in: Callable | None = None
    compiled_und_out: Callable | None = None
    # The generation rows' attention over their prompt's keys and their own (`layers.attention` unless FP8 attention
    # is on: `cosmos3.model.fp8_attention`, set by `use_fp8_attention`).
    generation_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = staticmethod(attention)
    # Called after every layer of the prompt cache and the generation pass (the server's worker sets it for a
    # batch, so that a waiting conversation can take the GPU between layers: cosmos3.turns).
    between_layers: Callable[[], None] | None = None

    def compile_generation_layers(self, min_rows: int = 0, backend: str | Callable = "inductor") -> None:
        """torch.compile the generation layer's regions around attention (fuses norms, rotary, residual adds and the
        SwiGLU product into the matrix products' neighbours; benchmarks/README.md). Attention stays outside, so the
        compiled shapes depend only on the number of generation rows, never on the prompt's length: a new
        resolution or frame count compiles once per process (seconds with a warm Inductor cache), a new prompt does
        not compile at all. Passes of fewer than `min_rows` rows (all branches) run uncompiled."""
        # One specialisation per (rows, branches) shape: a server meets more than dynamo's default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compile_min_rows = min_rows
        self.compiled_gen_in = torch.compile(gen_in, dynamic=False, backend=backend)
        self.compiled_gen_out = torch.compile(gen_out, dynamic=False, backend=backend)

    def compile_decode_layers(self, backend: str | Callable = "inductor") -> None:
        """torch.compile the understanding layer's regions around attention for the one-token decode step. A step
        of a Nano-width Reasoner is otherwise ~2,200 small kernels (norms, rotary, residuals, the SwiGLU product)
        around the matrix-vector products, which a CUDA graph replays but cannot merge (benchmarks/README.md,
        "Reasoner": a batch-1 step on an H200 took 8.97 ms plain, 6.13 ms compiled; reading the weights takes 3.2).
        Attention and the KV write stay outside, so the compiled shapes depend only on the rows stepped, never on
        the cache's length; the rows are a dynamic dimension from the second size on (dynamo's automatic dynamic
        shapes; one row is a size of its own), so the scheduler's seven powers of two compile three times, not
        seven. Inductor keeps eager's bf16 roundings (`emulate_precision_casts`), so that the fused step rounds as
        the plain one does."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        options = {"emulate_precision_casts": True} if backend == "inductor" else None
        self.compiled_und_in = torch.compile(und_in, backend=backend, options=options)
        self.compiled_und_out = torch.compile(und_out, backend=backend, options=options)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def time_embedding(self, timestep: float | torch.Tensor) -> torch.Tensor:
        """Embedding of a scheduler timestep (0..1000 scale), in the model dtype."""
        t = torch.as_tensor(timestep, device=self.proj_in.weight.device).reshape(1) * self.config.timestep_scale
        return self.time_embedder(t).to(self.dtype)[0]

    def embed_generation_tokens(
        self,
        packed: Packed,
        vision: torch.Tensor,
        temb: torch.Tensor,
        sound: torch.Tensor | None,
        action: torch.Tensor | None,
    ) -> torch.Tensor:
        """Vision, sound and action latents -> gen-pathway hidden states, in sequence order.

        Only noisy frames get the timestep embedding (clean ones get none, not a t=0 one); vision has no
        modality embedding, sound and action do.
        """
        cfg = self.config
        dtype = self.dtype
        t, h, w = packed.vision_grid
        per_frame = packed.vision_tokens_per_frame
        x = self.proj_in(patchify(vision.to(dtype), cfg.latent_patch_size)).unflatten(0, (t, per_frame))
        noisy = packed.vision_noisy_frames
        x[noisy] = x[noisy] + temb
        parts = [x.flatten(0, 1)]
        if packed.sound_len:
            s = self.audio_proj_in(sound.to(dtype).T) + self.audio_modality_embed
            parts.append(s + temb)  # every sound frame is noisy
        if packed.action_len:
            a = self.action_proj_in(action.to(dtype), packed.action_domain) + self.action_modality_embed
            noisy = packed.action_noisy_frames
            if len(noisy):
                a[noisy] = a[noisy] + temb
            parts.append(a)
        return torch.cat(parts)

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables `[*shape, head_dim]` for mRoPE position ids `[3, *shape]`, in the model dtype."""
        cfg = self.config
        return rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)

    def forward(
        self,
        packed: Packed,
        vision: torch.Tensor,
        timestep: float | torch.Tensor,
        sound: torch.Tensor | None = None,
        action: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One denoiser pass over a packed sample.

        vision `[C, T, h, w]`, sound `[S, T_s]`, action `[chunk, A]` latents; returns velocities of the same shapes,
        exactly zero at clean (conditioning) frames. The understanding tokens never attend to generation tokens, so
        this is the prompt's keys and values (`und_cache`) followed by one generation pass (`forward_gen`).
        """
        return self.forward_gen([packed], [self.und_cache(packed)], vision, timestep, sound, action)[0]

    # ------------------------------------------------------------------ understanding pathway
    def und_layer(
        self,
        i: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KeysValues | None = None,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        gen_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Decoder layer `i` on understanding hidden states `[..., N, H]`: the one definition behind the prompt cache
        of the denoiser and the Reasoner's prefill and decode steps.

        `kv` decides which keys and values the queries attend to (a KV cache); without it the tokens attend to
        their own, with the `causal` / `mask` of `attention`. `gen_kv`, when given, receives this layer's keys (as
        generation queries see them, rotated) and values. `compiled`: run the regions `compile_decode_layers`
        compiled (when it has).
        """
        layer = self.layers[i]
        compiled = compiled and self.compiled_und_in is not None
        q, k, v, k_gen = (self.compiled_und_in if compiled else und_in)(layer, x, cos, sin, gen_kv is not None)
        if gen_kv is not None:
            gen_kv.append((k_gen, v))
        keys, values = kv(i, k, v) if kv is not None else (k, v)
        attended = attention(q, keys, values, causal=causal, mask=mask)
        return (self.compiled_und_out if compiled else und_out)(layer, x, attended)

    def und_cache(self, packed: Packed) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the understanding keys (as generation queries see them, rotated) and values of a prompt.

        The understanding tokens never attend to generation tokens, so these are the same at every denoising
        step: computed once per request and prompt instead of once per step."""
        n = packed.und_len
        cos, sin = self.rope(packed.position_ids[:, :n])
        x = self.embed_tokens(packed.input_ids)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(len(self.layers)):
            x = self.und_layer(i, x, cos, sin, causal=True, gen_kv=cache)
            if self.between_layers is not None:
                self.between_layers()
        return cache

    def causal_forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        attn_mask: torch.Tensor | None = None,
        deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The understanding pathway alone, as a causal LM over `[B, S, H]` embeddings with a KV cache (Reasoner).

        `attn_mask` (`[B, 1, S, T]`, True = attend) is needed only with padding; without it a prefill is causal and
        a one-token step sees the whole cache. `deepstack` = (visual token mask `[B, S]`, per-layer features) adds
        the vision tower's intermediate features after the first layers, as Qwen3-VL does.
        """
        causal = attn_mask is None and cache.length == 0 and x.shape[1] > 1
        for i in range(len(self.layers)):
            x = self.und_layer(i, x, cos, sin, kv=cache.update, causal=causal, mask=attn_mask)
            if deepstack is not None and i < len(deepstack[1]):
                x = x.clone()
                x[deepstack[0]] = x[deepstack[0]] + deepstack[1][i].to(x.dtype)
        cache.length += x.shape[1]
        return self.norm(x)

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        write_at: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One new token per row with static shapes, so that a CUDA graph can capture it (Reasoner decoding).

        tokens `[B]`, positions `[3, B, 1]`, write_at `[1]` (the cache slot of this token), slots `[B, max_len]`
        (True where the cache holds a token to attend to, this one included). Returns fp32 logits `[B, vocab]`.
        """
        x = self.embed_tokens(tokens)[:, None]
        cos, sin = self.rope(positions)
        mask = slots[:, None, None, :]
        write = lambda i, k, v: cache.write(i, k, v, write_at)
        for i in range(len(self.layers)):
            x = self.und_layer(i, x, cos, sin, kv=write, mask=mask, compiled=True)
        return self.lm_head(self.norm(x)[:, -1]).float()

    # ------------------------------------------------------------------ generation pathway
    def forward_gen(
        self,
        packs: list[Packed],
        caches: list[list[tuple[torch.Tensor, torch.Tensor]]],
        vision: torch.Tensor | list[torch.Tensor],
        timestep: float | torch.Tensor,
        sound: torch.Tensor | list[torch.Tensor | None] | None = None,
        action: torch.Tensor | list[torch.Tensor | None] | None = None,
        rows_per_chunk: int = ROWS_PER_CHUNK,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """One denoising pass for several branches of the same shape, batched: the CFG branches of a request
        (sharing its noisy tokens: pass tensors), or those of several requests (pass one latent per branch).

        The understanding pathway comes from `und_cache`; the generation projections and MLPs run once over every
        branch's rows (`rows_per_chunk` bounds the MLP's activation memory). Attention runs per branch: the
        branches attend to prompts of different lengths.
        """
        branches = len(packs)
        shared = not isinstance(vision, list)
        per_branch = (lambda v: [v] * branches) if shared else (lambda v: v if isinstance(v, list) else [v] * branches)
        visions, sounds, actions = per_branch(vision), per_branch(sound), per_branch(action)
        if branches > 1 and branches * (packs[0].seq_len - packs[0].und_len) > rows_per_chunk:
            # Large requests: the GEMMs are already big enough, so one branch at a time keeps peak memory at a
            # single pass's (the reference's) instead of growing with the branches.
            return [
                self.forward_gen([p], [c], v, timestep, s, a, rows_per_chunk)[0]
                for p, c, v, s, a in zip(packs, caches, visions, sounds, actions, strict=True)
            ]
        temb = self.time_embedding(timestep)
        if shared:
            embedded = self.embed_generation_tokens(packs[0], vision, temb, sound, action)
            tokens = embedded.shape[0]
            x = embedded.expand(branches, -1, -1).reshape(branches * tokens, -1)
        else:
            x = torch.cat(
                [
                    self.embed_generation_tokens(p, v, temb, s, a)
                    for p, v, s, a in zip(packs, visions, sounds, actions, strict=True)
                ]
            )
            tokens = x.shape[0] // branches
        tables = [self.rope(p.position_ids[:, p.und_len :]) for p in packs]
        cos = torch.stack([t[0] for t in tables])
        sin = torch.stack([t[1] for t in tables])
        sp = None
        if self.groups.ulysses is not None:  # sequence parallel: this rank keeps its chunk of every branch's rows
            sp = SequenceShard(self.groups.ulysses, self.groups.ulysses_rank, self.groups.layout.ulysses_degree, tokens)
            x = sp.rows(x.unflatten(0, (branches, tokens))).flatten(0, 1)
            cos, sin = sp.rows(cos), sp.rows(sin)
        cos, sin = cos.flatten(0, 1), sin.flatten(0, 1)
        for i, layer in enumerate(self.layers):
            x = self.gen_layer(layer, x, cos, sin, [c[i] for c in caches], rows_per_chunk, sp)
            if self.between_layers is not None:
                self.between_layers()
        x = self.norm_moe_gen(x)
        if sp is not None:
            x = sp.gather(x.unflatten(0, (branches, sp.chunk))).flatten(0, 1)
        return [self.decode_generation_tokens(p, x[b * tokens : (b + 1) * tokens]) for b, p in enumerate(packs)]

    def gen_layer(
        self,
        layer: MoTDecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        und_kv: list[tuple[torch.Tensor, torch.Tensor]],
        rows_per_chunk: int,
        sp: SequenceShard | None = None,
    ) -> torch.Tensor:
        """One decoder layer on the generation rows of every branch (`x` = branches stacked along rows); branch b
        attends to its prompt's keys and values `und_kv[b]` followed by its own. With sequence parallelism (`sp`)
        the rows are this rank's chunk of each branch, and attention runs on all rows of this rank's heads."""
        branches = len(und_kv)
        compiled = self.compiled_gen_in is not None and x.shape[0] >= self.compile_min_rows
        q, k, v = (self.compiled_gen_in if compiled else gen_in)(layer, x, cos, sin)
        q, k, v = (t.unflatten(0, (branches, -1)) for t in (q, k, v))
        if sp is not None:
            q, k, v = sp.to_heads(q), sp.to_heads(sp.kv_heads(k)), sp.to_heads(sp.kv_heads(v))
            k, v = k[:, : sp.tokens], v[:, : sp.tokens]  # the padding rows are never attended to
            und_kv = [(sp.own_kv_heads(k_und), sp.own_kv_heads(v_und)) for k_und, v_und in und_kv]
        attended = [
            self.generation_attention(q[b], torch.cat([k_und, k[b]]), torch.cat([v_und, v[b]]))
            for b, (k_und, v_und) in enumerate(und_kv)
        ]
        out = attended[0][None] if branches == 1 else torch.stack(attended)  # one branch: no copy
        if sp is not None:
            out = sp.to_rows(out)
        return (self.compiled_gen_out if compiled else gen_out)(layer, x, out.flatten(0, 1), rows_per_chunk)

    def decode_generation_tokens(self, packed: Packed, rows: torch.Tensor):
        """One branch's final generation rows -> velocities of its vision, sound and action latents."""
        cfg = self.config
        t, h, w = packed.vision_grid
        nv = t * packed.vision_tokens_per_frame
        noisy = packed.vision_noisy_frames
        vision_tokens = rows[:nv].unflatten(0, (t, packed.vision_tokens_per_frame))[noisy].flatten(0, 1)
        v_vision = rows.new_zeros(cfg.latent_channel, t, h, w)
        if len(noisy):
            v_vision[:, noisy] = unpatchify(self.proj_out(vision_tokens), len(noisy), h, w, cfg.latent_patch_size)
        v_sound = v_action = None
        offset = nv
        if packed.sound_len:
            v_sound = self.audio_proj_out(rows[offset : offset + packed.sound_len]).T
            offset += packed.sound_len
        if packed.action_len:
            v_action = rows.new_zeros(packed.action_len, cfg.action_dim)
            noisy = packed.action_noisy_frames
            if len(noisy):
                rows = rows[offset : offset + packed.action_len][noisy]
                v_action[noisy] = self.action_proj_out(rows, packed.action_domain)
        return v_vision, v_sound, v_action


def und_in(
    layer: MoTDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gen_keys: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An understanding layer up to attention: pre-norm, q/k/v, per-head norms, rotary -> q, k, v and, with
    `gen_keys`, the keys as generation queries see them (Edge normalises them once more before rotation)."""
    attn = layer.self_attn
    q, k_raw, v = attn.und_qkv(layer.input_layernorm(x))
    q, k = apply_rope(q, cos, sin), apply_rope(k_raw, cos, sin)
    k_gen = None
    if gen_keys:
        k_gen = k if attn.k_norm_und_for_gen is None else apply_rope(attn.k_norm_und_for_gen(k_raw), cos, sin)
    return q, k, v, k_gen


def und_out(layer: MoTDecoderLayer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """An understanding layer after attention: output projection and residual, then the MLP block."""
    x = x + layer.self_attn.to_out(attended)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def gen_in(
    layer: MoTDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A generation layer up to attention: pre-norm, q/k/v, per-head norms, rotary. `[N, H]` -> `[N, heads, hd]`."""
    q, k, v = layer.self_attn.gen_qkv(layer.input_layernorm_moe_gen(x))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def gen_out(layer: MoTDecoderLayer, x: torch.Tensor, attended: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """A generation layer after attention: output projection and residual, then the MLP block (in chunks of
    `rows_per_chunk` rows, which bounds its activation memory)."""
    x = x + layer.self_attn.to_add_out(attended)

    def mlp(rows: torch.Tensor) -> torch.Tensor:
        return rows + layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(rows))

    return mlp(x) if x.shape[0] <= rows_per_chunk else torch.cat([mlp(c) for c in x.split(rows_per_chunk)])
