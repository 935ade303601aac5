"""Opt-in FP8 (e4m3) matmuls for the generation pathway: row-wise activation scales, per-channel weight scales.

Changes results beyond bf16 noise (benchmarks/README.md reports by how much); off unless asked for.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GENERATION_LINEARS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "gate_proj", "up_proj", "down_proj")


class Fp8Linear(nn.Module):
    """`y = x W^T + b` with x and W in e4m3: one scale per activation row, one per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (w.float() / scale).to(FP8))  # [out, in], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.out_dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (rows / scale.to(rows.dtype)).to(FP8)
        out = torch._scaled_mm(
            quantized,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
        )
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_fp8_generation_linears(model: nn.Module) -> int:
    """Swap the generation pathway's linears (attention projections and MLP) for FP8 ones; returns how many.

    The understanding pathway stays exact: it is computed once per request (and serves the Reasoner)."""
    if not torch.cuda.is_available():
        raise RuntimeError("FP8 matmuls need a CUDA GPU with FP8 support (Hopper or newer)")
    count = 0
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp_moe_gen):
            for name in GENERATION_LINEARS:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, Fp8Linear(linear))
                    count += 1
    return count
