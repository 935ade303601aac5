"""Building blocks of the Mixture-of-Transformers: norms, MLP, rotary embedding, the attention helper and weights."""

from __future__ import annotations

import functools
import importlib.util
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from cosmos3.config import TransformerConfig


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, statistics in fp32.

    The Qwen flavour rounds the normalised value to the weight dtype before the multiply; the Nemotron flavour
    (Edge) multiplies in fp32 and rounds once at the end. Both match their reference bit for bit in bf16.
    """

    def __init__(self, dim: int, eps: float, nemotron: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.nemotron = nemotron

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm is one fused kernel on a GPU (aten._fused_rms_norm, torch >= 2.9) where the formula
        # written out is seven (fp32 copy, square, mean, eps, rsqrt, scale, round): 11 ms of a 62 ms eager guided
        # step of a 720p image on an H200, 2.5 ms fused (benchmarks/README.md). It computes in fp32 and rounds once
        # at the end, as the Nemotron flavour does; the Qwen flavour rounds before the weight multiply: on a GPU a
        # Triton kernel does both roundings in one pass (`cosmos3.model.kernels`), elsewhere the weight is applied
        # apart. (Weights and inputs share one dtype: a checkpoint loads in one.)
        shape = (x.shape[-1],)
        if self.nemotron or self.weight.dtype not in (torch.float16, torch.bfloat16):
            return F.rms_norm(x, shape, self.weight, self.eps)
        if (kernels := triton_kernels_for(x)) and kernels.norm_fits(x, self.weight):  # both roundings, one pass
            return kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, shape, None, self.eps) * self.weight


class MLP(nn.Module):
    """SwiGLU (`down(silu(gate(x)) * up(x))`) or squared ReLU (`down(relu(up(x))^2)`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.act = act
        if act == "silu":
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "relu2":
            return self.down_proj(torch.relu(self.up_proj(x)).square())
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, axes: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved 3D mRoPE tables for `[3, *shape]` positions (T, H, W rows) -> cos, sin `[*shape, head_dim]`.

    Frequency j takes its position from the T row, except j = 1, 4, 7, ... (< 3*axes[1]) from H and
    j = 2, 5, 8, ... (< 3*axes[2]) from W: the layout THW THW ... TTTT the model was trained with.
    Computed in fp32 (bf16 cannot hold positions past 256), then cast.
    """
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [3, *shape, head_dim/2]
    table = freqs[0].clone()
    for row, offset in ((1, 1), (2, 2)):
        sl = slice(offset, axes[row] * 3, 3)
        table[..., sl] = freqs[row][..., sl]
    emb = torch.cat([table, table], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.cache
def triton_kernels() -> ModuleType | None:
    """`cosmos3.model.kernels` where Triton is installed (torch's CUDA wheels bring it), else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    from cosmos3.model import kernels

    return kernels


def triton_kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernels where they run instead of eager formulas: on a GPU, outside compiled regions (Inductor
    fuses the eager formulas itself)."""
    return triton_kernels() if x.is_cuda and not torch.compiler.is_compiling() else None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding on `[..., N, heads, head_dim]` with `[..., N, head_dim]` tables. On a GPU one
    Triton kernel with the same roundings (`cosmos3.model.kernels`)."""
    if (kernels := triton_kernels_for(x)) and kernels.rope_fits(x, cos):
        return kernels.rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


# Which SDPA kernel runs is torch's choice, on purpose. On Hopper and Blackwell with cuDNN newer than 9.15 (what torch
# 2.11's CUDA 13 wheels bring) torch tries cuDNN's fused attention first, the fastest for these shapes (about 1.6x
# flash at 720p, benchmarks/README.md); it skips older cuDNN releases for a correctness bug (pytorch#169849).
# cosmos3 used to set cuDNN first itself with `sdpa_kernel(..., set_priority=True)`, which writes process-global
# flags: another thread's attention reads them meanwhile, and when cosmos3 attended before torch had made its first
# choice of the process, the context manager restored torch's not-yet-initialised order (flash first) for the rest
# of the process, so every other library's attention in it ran 1.6x slower (diffusers' 720p step 9.2 s instead of
# 6.5 s; benchmarks/README.md, "2026-12-03, night").


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads: the one place where queries meet keys, so tensor- and
    sequence-parallel attention (an all-to-all around SDPA) has a single place to hook in.

    q `[B, N, heads, head_dim]`, k and v `[B, M, kv_heads, head_dim]` (the layout the projections make; the batch
    dimension may be left out); `mask` `[B, 1, N, M]`, True = attend. `causal` aligns the mask to the top left,
    so it suits N == M only. Returns `[B, N, heads * head_dim]` (or `[N, ...]` without a batch dimension).
    """
    unbatched = q.dim() == 3
    if unbatched:  # the fused SDPA kernels take 4-D inputs only
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, enable_gqa=True
    )
    out = out.transpose(1, 2).flatten(2)
    return out[0] if unbatched else out


class MoTAttention(nn.Module):
    """The attention weights of both pathways, each with its own projections and norms.

    The understanding (text) pathway attends causally to itself. The generation pathway attends, without a mask,
    to the understanding keys/values followed by its own. The layer steps that combine them live in
    `cosmos3.model.transformer` (one per pathway).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h, hd, nq, nkv, bias = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.attention_bias,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, hd
        norm = lambda: RMSNorm(hd, cfg.rms_norm_eps, cfg.nemotron_norm)
        # Understanding pathway.
        self.to_q = nn.Linear(h, nq * hd, bias=bias)
        self.to_k = nn.Linear(h, nkv * hd, bias=bias)
        self.to_v = nn.Linear(h, nkv * hd, bias=bias)
        self.to_out = nn.Linear(nq * hd, h, bias=bias)
        self.norm_q = norm() if cfg.qk_norm_for_text else nn.Identity()
        self.norm_k = norm() if cfg.qk_norm_for_text else nn.Identity()
        # Edge-style checkpoints normalise the understanding keys once more before generation queries see them.
        self.k_norm_und_for_gen = norm() if cfg.use_und_k_norm_for_gen and not cfg.qk_norm_for_text else None
        # Generation pathway.
        self.add_q_proj = nn.Linear(h, nq * hd, bias=bias)
        self.add_k_proj = nn.Linear(h, nkv * hd, bias=bias)
        self.add_v_proj = nn.Linear(h, nkv * hd, bias=bias)
        self.to_add_out = nn.Linear(nq * hd, h, bias=bias)
        self.norm_added_q = norm()
        self.norm_added_k = norm()

    def _heads(
        self, x: torch.Tensor, to_q: nn.Module, to_k: nn.Module, to_v: nn.Module, norm_q: nn.Module, norm_k: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections split into heads, `[..., N, heads, head_dim]`, q and k normalised per head."""
        q = norm_q(to_q(x).unflatten(-1, (self.num_heads, self.head_dim)))
        k = norm_k(to_k(x).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = to_v(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return q, k, v

    def und_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Understanding-pathway q, k, v: normalised, not yet rotated (Edge's extra key norm comes before rotation)."""
        return self._heads(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)

    def gen_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generation-pathway q, k, v: normalised, not yet rotated."""
        return self._heads(x, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)


class MoTDecoderLayer(nn.Module):
    """Pre-norm residual block, norms and MLP per pathway; run by `Cosmos3Transformer.und_layer` / `gen_layer`."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.nemotron_norm)
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.input_layernorm_moe_gen = norm()
        self.post_attention_layernorm_moe_gen = norm()


class TimestepEmbedder(nn.Module):
    """Sinusoid (cos first, 256 channels, max period 1e4) -> Linear -> SiLU -> Linear. Kept in fp32."""

    def __init__(self, hidden_size: int, channels: int = 256):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class DomainLinear(nn.Module):
    """One `[in, out]` matrix and bias per embodiment domain, stored as embedding rows (the checkpoint layout)."""

    def __init__(self, in_features: int, out_features: int, num_domains: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fc = nn.Embedding(num_domains, in_features * out_features)
        self.bias = nn.Embedding(num_domains, out_features)

    def forward(self, x: torch.Tensor, domain_id: int) -> torch.Tensor:
        weight = self.fc.weight[domain_id].view(self.in_features, self.out_features)
        return x @ weight + self.bias.weight[domain_id]
