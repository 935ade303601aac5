"""The Triton rotary kernel equals eager rotary bit for bit: natively on a GPU, in Triton's interpreter on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosmos3.model import layers

pytest.importorskip("triton")

CASES = [  # (leading dims, heads, head_dim)
    ((1840,), 32, 128),  # a 720p image's two branches of generation rows, Nano's query heads
    ((1840,), 8, 128),  # ... its key heads
    ((2, 7), 5, 16),  # batch and sequence dims, heads that fill no power-of-two block
    ((3,), 20, 8),  # more heads than one block
]


def eager(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(-2) + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin.unsqueeze(-2)


def tables(lead, dim, dtype, device):
    pos = torch.arange(int(torch.tensor(lead).prod()), device=device, dtype=torch.float32).reshape(*lead, 1)
    angle = pos / (100.0 ** (torch.arange(dim, device=device) % (dim // 2) / (dim // 2)))
    return angle.cos().to(dtype), angle.sin().to(dtype)


def inputs(lead, heads, dim, dtype, device):
    """A contiguous x and a strided one (the middle third of each row, as a query of a fused q/k/v would be)."""
    x = (torch.randn(*lead, heads, dim, device=device) * 4).to(dtype)
    strided = (torch.randn(*lead, heads, 3 * dim, device=device) * 4).to(dtype)[..., dim : 2 * dim]
    return x, strided


INTERPRETED = """
import sys, torch
from cosmos3.model import rope_kernel
sys.path.insert(0, {tests!r})
from test_rope_kernel import CASES, eager, inputs, tables
for lead, heads, dim in CASES:
    lead = (min(lead[0], 64), *lead[1:])  # the interpreter runs one program at a time, in numpy
    cos, sin = tables(lead, dim, torch.bfloat16, "cpu")
    for x in inputs(lead, heads, dim, torch.bfloat16, "cpu"):
        assert rope_kernel.fits(x, cos)
        assert torch.equal(rope_kernel.rope(x, cos, sin), eager(x, cos, sin)), (lead, heads, dim, x.stride())
print("equal")
"""


def test_the_interpreted_kernel_rounds_as_eager():
    """In Triton's interpreter, which runs on a CPU; in a process of its own, since TRITON_INTERPRET is read when a
    kernel is defined and can stay in effect for the rest of the process (a GPU test after it ran interpreted)."""
    script = INTERPRETED.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "equal", run.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native kernel needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_apply_rope_on_a_gpu_rounds_as_eager_with_the_kernel_in_bf16(case, dtype, monkeypatch):
    lead, heads, dim = case
    cos, sin = tables(lead, dim, dtype, "cuda")
    kernel = layers.rope_kernel()
    calls = []
    monkeypatch.setattr(kernel, "rope", lambda *a, _rope=kernel.rope: calls.append(1) or _rope(*a))
    for x in inputs(lead, heads, dim, dtype, "cuda"):
        assert torch.equal(layers.apply_rope(x, cos, sin), eager(x, cos, sin))
    assert calls == ([1, 1] if dtype == torch.bfloat16 else [])


def test_tables_of_another_dtype_and_odd_halves_take_the_eager_formula():
    kernel = pytest.importorskip("cosmos3.model.rope_kernel")
    x = torch.randn(4, 2, 16, dtype=torch.bfloat16)
    assert not kernel.fits(x, torch.ones(4, 16))  # fp32 tables promote the product in eager
    assert not kernel.fits(x.half(), torch.ones(4, 16, dtype=torch.half))
    assert not kernel.fits(torch.randn(4, 2, 12).bfloat16(), torch.ones(4, 12).bfloat16())  # a half of 6
    assert kernel.fits(x, torch.ones(4, 16, dtype=torch.bfloat16))
