"""Rotary embedding as one Triton kernel, with eager PyTorch's roundings.

Eager rotate-half rotary (`x * cos + cat(-x2, x1) * sin`) is five kernels per tensor (negate, cat, two products,
sum), each reading and writing the whole tensor: 4.4 ms of a 54 ms eager guided step of a 720p image on an H200,
0.5 ms as this kernel (benchmarks/README.md). It reads `x` once and rounds where eager does: each product of two
bf16 values is exact in fp32 and rounded to bf16, then their sum is rounded. Its output equals eager's bit for bit
(tests/test_rope_kernel.py). Compiled regions keep the eager formula, which Inductor fuses itself.
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
    row = tl.program_id(0)
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


def fits(x: torch.Tensor, cos: torch.Tensor) -> bool:
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
