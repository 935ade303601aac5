"""The Cosmos 3 Mixture-of-Transformers denoiser.

Parameter names are the published checkpoint's flat names, so loading is a plain `load_state_dict`
after the renames in `cosmos3.loading.checkpoint`.
"""

from __future__ import annotations

import torch
from torch import nn

from cosmos3.loading.config import TransformerConfig
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


class KVCache:
    """Keys and values of the understanding pathway per layer, `[B, max_len, kv_heads, head_dim]`, filled in order."""

    def __init__(self, cfg: TransformerConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


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
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
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

    compiled_gen_layer = None  # set by `compile_generation_layers`

    def compile_generation_layers(self) -> None:
        """torch.compile the generation layer (fuses norms, rotary and residual adds); opt-in, as each new
        request shape compiles again (tens of seconds)."""
        self.compiled_gen_layer = torch.compile(type(self).gen_layer, dynamic=False)

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
        exactly zero at clean (conditioning) frames.
        """
        cfg = self.config
        und = self.embed_tokens(packed.input_ids)
        gen = self.embed_generation_tokens(packed, vision, self.time_embedding(timestep), sound, action)
        cos, sin = rope_cos_sin(packed.position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)
        n = packed.und_len
        rope_und, rope_gen = (cos[:n], sin[:n]), (cos[n:], sin[n:])
        for layer in self.layers:
            und, gen = layer(und, gen, rope_und, rope_gen)
        gen = self.norm_moe_gen(gen)
        return self.decode_generation_tokens(packed, gen)

    # ------------------------------------------------------------------ denoising fast path
    def und_cache(self, packed: Packed) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the understanding keys (as generation queries see them, rotated) and values of a prompt.

        The understanding tokens never attend to generation tokens, so these are the same at every denoising
        step: computed once per request and prompt instead of once per step."""
        cfg = self.config
        n = packed.und_len
        cos, sin = rope_cos_sin(packed.position_ids[:, :n], cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)
        x = self.embed_tokens(packed.input_ids)
        cache = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.und_qkv(layer.input_layernorm(x))
            k_for_gen = attn.k_norm_und_for_gen(k) if attn.k_norm_und_for_gen is not None else k
            cache.append((apply_rope(k_for_gen, cos, sin), v))
            if i == len(self.layers) - 1:
                break  # the last layer's understanding output is never used by generation
            out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, causal=True)
            x = x + attn.to_out(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return cache

    def forward_gen(
        self,
        packs: list[Packed],
        caches: list[list[tuple[torch.Tensor, torch.Tensor]]],
        vision: torch.Tensor | list[torch.Tensor],
        timestep: float | torch.Tensor,
        sound: torch.Tensor | list[torch.Tensor | None] | None = None,
        action: torch.Tensor | list[torch.Tensor | None] | None = None,
        rows_per_chunk: int = 32768,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """One denoising pass for several branches of the same shape, batched: the CFG branches of a request
        (sharing its noisy tokens: pass tensors), or those of several requests (pass one latent per branch).

        Same arithmetic as `forward` for each branch, but the understanding pathway comes from `und_cache`, and
        the generation projections and MLPs run once over every branch's rows (`rows_per_chunk` bounds the MLP's
        activation memory). Attention runs per branch: the branches attend to prompts of different lengths.
        """
        cfg = self.config
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
            gen = self.embed_generation_tokens(packs[0], vision, temb, sound, action)
            tokens = gen.shape[0]
            x = gen.expand(branches, -1, -1).reshape(branches * tokens, -1)
        else:
            x = torch.cat(
                [
                    self.embed_generation_tokens(p, v, temb, s, a)
                    for p, v, s, a in zip(packs, visions, sounds, actions, strict=True)
                ]
            )
            tokens = x.shape[0] // branches
        tables = [
            rope_cos_sin(p.position_ids[:, p.und_len :], cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)
            for p in packs
        ]
        cos = torch.cat([t[0] for t in tables])
        sin = torch.cat([t[1] for t in tables])
        gen_layer = self.compiled_gen_layer or self.gen_layer
        for i, layer in enumerate(self.layers):
            x = gen_layer(layer, x, cos, sin, [c[i] for c in caches], rows_per_chunk)
        x = self.norm_moe_gen(x)
        return [self.decode_generation_tokens(p, x[b * tokens : (b + 1) * tokens]) for b, p in enumerate(packs)]

    @staticmethod
    def gen_layer(
        layer: MoTDecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        und_kv: list[tuple[torch.Tensor, torch.Tensor]],
        rows_per_chunk: int,
    ) -> torch.Tensor:
        """One decoder layer on the generation rows of every branch (`x` = branches stacked along rows)."""
        attn = layer.self_attn
        tokens = x.shape[0] // len(und_kv)
        h = layer.input_layernorm_moe_gen(x)
        q = apply_rope(attn.norm_added_q(attn.add_q_proj(h).unflatten(-1, (attn.num_heads, attn.head_dim))), cos, sin)
        k = apply_rope(
            attn.norm_added_k(attn.add_k_proj(h).unflatten(-1, (attn.num_kv_heads, attn.head_dim))), cos, sin
        )
        v = attn.add_v_proj(h).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        outs = []
        for b, (k_und, v_und) in enumerate(und_kv):
            rows = slice(b * tokens, (b + 1) * tokens)
            outs.append(attention(q[rows], torch.cat([k_und, k[rows]]), torch.cat([v_und, v[rows]]), causal=False))
        x = x + attn.to_add_out(torch.cat(outs))

        def mlp(rows: torch.Tensor) -> torch.Tensor:
            return rows + layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(rows))

        return mlp(x) if x.shape[0] <= rows_per_chunk else torch.cat([mlp(c) for c in x.split(rows_per_chunk)])

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
        cfg = self.config
        x = self.embed_tokens(tokens)[:, None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)
        mask = slots[:, None, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.und_qkv(layer.input_layernorm(x))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.k[i].index_copy_(1, write_at, k)
            cache.v[i].index_copy_(1, write_at, v)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),
                cache.k[i].transpose(1, 2),
                cache.v[i].transpose(1, 2),
                attn_mask=mask,
                enable_gqa=True,
            )
            x = x + attn.to_out(out.transpose(1, 2).flatten(2))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x)[:, -1]).float()

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
        start, length = cache.length, x.shape[1]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.und_qkv(layer.input_layernorm(x))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys, values = cache.update(i, k, v)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys.transpose(1, 2),
                values.transpose(1, 2),
                attn_mask=attn_mask,
                is_causal=attn_mask is None and start == 0 and length > 1,
                enable_gqa=True,
            )
            x = x + attn.to_out(out.transpose(1, 2).flatten(2))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if deepstack is not None and i < len(deepstack[1]):
                x = x.clone()
                x[deepstack[0]] = x[deepstack[0]] + deepstack[1][i].to(x.dtype)
        cache.length += length
        return self.norm(x)

    def decode_generation_tokens(self, packed: Packed, gen: torch.Tensor):
        cfg = self.config
        t, h, w = packed.vision_grid
        nv = t * packed.vision_tokens_per_frame
        noisy = packed.vision_noisy_frames
        vision_tokens = gen[:nv].unflatten(0, (t, packed.vision_tokens_per_frame))[noisy].flatten(0, 1)
        v_vision = gen.new_zeros(cfg.latent_channel, t, h, w)
        if len(noisy):
            v_vision[:, noisy] = unpatchify(self.proj_out(vision_tokens), len(noisy), h, w, cfg.latent_patch_size)
        v_sound = v_action = None
        offset = nv
        if packed.sound_len:
            v_sound = self.audio_proj_out(gen[offset : offset + packed.sound_len]).T
            offset += packed.sound_len
        if packed.action_len:
            v_action = gen.new_zeros(packed.action_len, cfg.action_dim)
            noisy = packed.action_noisy_frames
            if len(noisy):
                rows = gen[offset : offset + packed.action_len][noisy]
                v_action[noisy] = self.action_proj_out(rows, packed.action_domain)
        return v_vision, v_sound, v_action
