"""The Triton kernels round as eager PyTorch: natively on a GPU, in Triton's interpreter on a CPU (its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosmos3.model import layers

pytest.importorskip("triton")

ROPE_CASES = [  # (leading dims, heads, head_dim)
    ((1840,), 32, 128),  # a 720p image's two branches of generation rows, Nano's query heads
    ((1840,), 8, 128),  # ... its key heads
    ((2, 7), 5, 16),  # batch and sequence dims, heads that fill no power-of-two block
    ((3,), 20, 8),  # more heads than one block
]
NORM_CASES = [  # x's shape; the last dim is normalised
    (1840, 4096),  # a 720p image's rows at Nano's width
    (1840, 32, 128),  # ... its query heads
    (3, 5, 96),  # a width that is no power of two
]


def eager_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(-2) + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin.unsqueeze(-2)


def eager_norm(x, weight, eps):  # diffusers' RMSNorm with a bf16 weight
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def tables(lead, dim, dtype, device):
    pos = torch.arange(int(torch.tensor(lead).prod()), device=device, dtype=torch.float32).reshape(*lead, 1)
    angle = pos / (100.0 ** (torch.arange(dim, device=device) % (dim // 2) / (dim // 2)))
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rope_inputs(lead, heads, dim, dtype, device):
    """A contiguous x and a strided one (the middle third of each row, as a query of a fused q/k/v would be)."""
    x = (torch.randn(*lead, heads, dim, device=device) * 4).to(dtype)
    strided = (torch.randn(*lead, heads, 3 * dim, device=device) * 4).to(dtype)[..., dim : 2 * dim]
    return x, strided


def norm_inputs(shape, device):
    x = (torch.randn(shape, device=device) * 3).bfloat16()
    weight = (torch.rand(shape[-1], device=device) + 0.5).bfloat16()
    return x, weight


def norm_close(got, expected):
    """Equal but for the fp32 sum of squares' order (and rsqrt's last bit): where that moves the normalised value
    across a bf16 rounding boundary, the output moves by one step of it, times the weight, rounded again (up to two
    steps of the output); in under 0.1% of the elements."""
    off = (got.float() - expected.float()).abs()
    steps = off / (expected.float().abs().clamp_min(1e-3) * 2**-8)  # 2**-8: bf16's step, relative, at its finest
    differing = (off != 0).float().mean().item()
    assert steps.max() <= 4 and differing < 1e-3, f"{differing:.2e} of the elements differ, by <= {steps.max():.2f}"


INTERPRETED = """
import sys, torch
from cosmos3.model import kernels
sys.path.insert(0, {tests!r})
from test_kernels import ROPE_CASES, NORM_CASES, eager_norm, eager_rope, norm_close, norm_inputs, rope_inputs, tables
for lead, heads, dim in ROPE_CASES:
    lead = (min(lead[0], 64), *lead[1:])  # the interpreter runs one program at a time, in numpy
    cos, sin = tables(lead, dim, torch.bfloat16, "cpu")
    for x in rope_inputs(lead, heads, dim, torch.bfloat16, "cpu"):
        assert kernels.rope_fits(x, cos)
        assert torch.equal(kernels.rope(x, cos, sin), eager_rope(x, cos, sin)), (lead, heads, dim, x.stride())
for shape in NORM_CASES:
    shape = (min(shape[0], 64), *shape[1:])
    x, weight = norm_inputs(shape, "cpu")
    assert kernels.norm_fits(x, weight)
    norm_close(kernels.rms_norm(x, weight, 1e-6), eager_norm(x, weight, 1e-6))
print("equal")
"""


def test_the_interpreted_kernels_round_as_eager():
    """In Triton's interpreter, which runs on a CPU; in a process of its own, since TRITON_INTERPRET is read when a
    kernel is defined and can stay in effect for the rest of the process (a GPU test after it ran interpreted)."""
    script = INTERPRETED.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "equal", run.stderr[-3000:]


def counting(monkeypatch, name):
    kernels = layers.triton_kernels()
    kernel = getattr(kernels, name)
    calls = []
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or kernel(*a))
    return calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_apply_rope_on_a_gpu_rounds_as_eager_with_the_kernel_in_bf16(case, dtype, monkeypatch):
    lead, heads, dim = case
    cos, sin = tables(lead, dim, dtype, "cuda")
    calls = counting(monkeypatch, "rope")
    for x in rope_inputs(lead, heads, dim, dtype, "cuda"):
        assert torch.equal(layers.apply_rope(x, cos, sin), eager_rope(x, cos, sin))
    assert calls == ([1, 1] if dtype == torch.bfloat16 else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native kernels need a CUDA GPU")
@pytest.mark.parametrize("shape", NORM_CASES, ids=str)
def test_the_qwen_norm_on_a_gpu_is_the_kernel_and_rounds_as_diffusers(shape, monkeypatch):
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    x, weight = norm_inputs(shape, "cuda")
    ref = DiffusersRMSNorm(shape[-1], eps=1e-6).to("cuda", torch.bfloat16)
    ours = layers.RMSNorm(shape[-1], 1e-6).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ours.weight.copy_(weight)
    calls = counting(monkeypatch, "rms_norm")
    with torch.inference_mode():
        norm_close(ours(x), ref(x))
        assert calls == [1]
        layers.RMSNorm(shape[-1], 1e-6, nemotron=True).to("cuda", torch.bfloat16)(x)  # torch's fused norm
        assert calls == [1]


def test_tables_of_another_dtype_and_odd_halves_take_the_eager_formula():
    kernels = pytest.importorskip("cosmos3.model.kernels")
    x = torch.randn(4, 2, 16, dtype=torch.bfloat16)
    assert not kernels.rope_fits(x, torch.ones(4, 16))  # fp32 tables promote the product in eager
    assert not kernels.rope_fits(x.half(), torch.ones(4, 16, dtype=torch.half))
    assert not kernels.rope_fits(torch.randn(4, 2, 12).bfloat16(), torch.ones(4, 12).bfloat16())  # a half of 6
    assert kernels.rope_fits(x, torch.ones(4, 16, dtype=torch.bfloat16))
    assert not kernels.norm_fits(x, torch.ones(16))  # an fp32 weight: eager keeps fp32
    assert not kernels.norm_fits(x.transpose(1, 2), torch.ones(2, dtype=torch.bfloat16))  # strided along the norm
