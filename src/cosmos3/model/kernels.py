"""Triton kernels for the uncompiled path's elementwise work, with eager PyTorch's roundings.

Rotary embedding: eager rotate-half (`x * cos + cat(-x2, x1) * sin`) is five kernels per tensor (negate, cat, two
products, sum), each reading and writing the whole tensor: 4.4 ms of a 54 ms eager guided step of a 720p image on an
H200, 0.5 ms as one kernel (benchmarks/README.md). It reads `x` once and rounds where eager does: each product of
two bf16 values is exact in fp32 and rounded to bf16, then their sum is rounded. Its output equals eager's bit for
bit (tests/test_kernels.py).

RMSNorm, the Qwen flavour (diffusers' `RMSNorm`): torch's fused `rms_norm` rounds once, after the weight, where the
reference rounds the normalised value to bf16 and again after the weight; applying the weight apart is a second
pass over the tensor (2.3 ms of that step). This kernel does both roundings in one pass. Only the fp32 sum of
squares adds in another order than torch's, which can move an output by one bf16 step, rarely.

Compiled regions keep the eager formulas, which Inductor fuses itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16(v):
    """fp32 `v` rounded to bf16 (to nearest, ties to even, as torch rounds), kept in fp32. Rounded with integer
    operations: the same on a GPU and in Triton's CPU interpreter (whose bf16 conversion truncates), and no fused
    multiply-add can skip it."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xn, stride_xh, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements (a long video in eager mode)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    table = row * 2 * HALF + d
    cos1, cos2 = tl.load(cos_ptr + table).to(tl.float32), tl.load(cos_ptr + table + HALF).to(tl.float32)
    sin1, sin2 = tl.load(sin_ptr + table).to(tl.float32), tl.load(sin_ptr + table + HALF).to(tl.float32)
    x = x_ptr + row * stride_xn + h * stride_xh + d
    x1 = tl.load(x, mask=mask).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask).to(tl.float32)
    # eager: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to bf16
    out1 = _bf16(_bf16(x1 * cos1) - _bf16(x2 * sin1))
    out2 = _bf16(_bf16(x2 * cos2) + _bf16(x1 * sin2))
    out = out_ptr + (row * heads + h) * 2 * HALF + d
    tl.store(out, out1.to(tl.bfloat16), mask=mask)  # exact: the values are bf16 already
    tl.store(out + HALF, out2.to(tl.bfloat16), mask=mask)


def rope_fits(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: bf16 (the dtype a GPU runs; in fp32 and fp16 a compiler's fused
    multiply-add or conversion shortcuts would round otherwise than eager), a power-of-two half head, unit stride
    along it."""
    half = x.shape[-1] // 2
    return (
        x.dtype == cos.dtype == torch.bfloat16
        and x.dim() >= 2
        and x.shape[-1] == 2 * half
        and half >= 1
        and half & (half - 1) == 0
        and x.stride(-1) == 1
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` for `[..., N, heads, head_dim]` with `[..., N, head_dim]` tables (broadcast over leading dims),
    as a new contiguous tensor."""
    *lead, heads, dim = x.shape
    rows = x.reshape(-1, heads, dim)  # a view for any x whose leading dims merge (a copy otherwise)
    cos, sin = (t.expand(*lead, dim).reshape(-1, dim).contiguous() for t in (cos, sin))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(heads), 16)
    grid = (rows.shape[0], triton.cdiv(heads, block))
    _rope[grid](rows, cos, sin, out, heads, rows.stride(0), rows.stride(1), HALF=dim // 2, BLOCK_H=block)
    return out


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, stride_row, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements (a long video in eager mode)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    x = tl.load(x_ptr + row * stride_row + offsets, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) * (1.0 / cols)  # torch's mean: the sum times 1 / n
    normed = _bf16(x * tl.math.rsqrt(variance + eps))  # eager rounds to the weight's dtype here ...
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * cols + offsets, _bf16(normed * w).to(tl.bfloat16), mask=mask)  # ... and after the weight


def norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` takes these: bf16 input and weight, unit stride along the normalised dim, at most 16,384
    wide (one row a program)."""
    return x.dtype == weight.dtype == torch.bfloat16 and x.stride(-1) == 1 and 1 <= x.shape[-1] <= 16384


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Qwen flavour of `RMSNorm` (diffusers' `RMSNorm`): statistics in fp32, the normalised value rounded to
    bf16, then multiplied by the weight and rounded again; one pass over `x`, as a new contiguous tensor."""
    cols = x.shape[-1]
    rows = x.reshape(-1, cols)  # a view for any x whose leading dims merge (a copy otherwise)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rms_norm[(rows.shape[0],)](rows, weight, out, rows.stride(0), cols, eps, BLOCK=triton.next_power_of_2(cols))
    return out
