"""FlashAttention-4's Hopper and Blackwell kernels (the `flash-attn-4` package, written in CUTLASS's CuTe DSL) for the
generation rows' attention: the same exact bf16 attention as cuDNN's, faster at video sizes.

At 720p two thirds of a guided step is this attention (about 44,000 queries over as many keys, 32 query heads on 8
KV heads of 128). Measured on an H200 (torch 2.11, cuDNN 9 through SDPA, flash-attn-4 4.0.0b40,
benchmarks/attention.py):

    queries    cuDNN SDPA           FlashAttention-4
     44,160    55.7 ms, 578 TF/s    47.6 ms, 676 TF/s   (0.855)
     18,720    10.2 ms, 574 TF/s     8.7 ms, 669 TF/s   (0.859)
      2,880    0.27 ms, 548 TF/s    0.24 ms, 621 TF/s   (0.882)
        920    0.11 ms              0.26 ms             (2.4: launch-bound, cuDNN stays)

Both land 2.3e-3 from an fp32 softmax(QK^T)V, and 3e-3 from each other: the distance two bf16 kernels are apart.

The package compiles its kernels the first time a shape class is met (~2.6 s; sequence lengths are dynamic, so a
new prompt or resolution compiles nothing), and importing it loads CUTLASS's MLIR library (~10 s on the H200
machine). `preload` starts the import in a thread while the checkpoint loads; compiled kernels are kept on disk
(FlashAttention-4's own cache, turned on here unless the environment says otherwise), so only the first process
of a machine compiles them (a later process's first 720p-shaped call: 0.01 s,
benchmarks/results/2026-12-03-h200-engine-flash.log).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch

from cosmos3.model.layers import attention

# Queries per call (one branch's generation rows) from which FlashAttention-4 runs and below which cuDNN does. The
# table above: FA4 is ahead from 2,880 queries (256p) and behind at 920 (a 720p image); 2,048 splits the two.
MIN_QUERIES = 2048

_import_lock = threading.Lock()
_preload: threading.Thread | None = None


def available(device: torch.device | str, dtype: torch.dtype, head_dim: int = 128) -> str | None:
    """None when FlashAttention-4 can run on `device` in `dtype` with heads of `head_dim`, else why not (without
    importing it: that takes seconds)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "FlashAttention-4 needs a CUDA GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention-4 runs in bfloat16 or float16, not {str(dtype).removeprefix('torch.')}"
    if head_dim % 8 or not 8 <= head_dim <= 256:  # its kernels' tiles (16-byte rows of bf16)
        return f"FlashAttention-4 takes head dimensions of 8 to 256 in steps of 8, not {head_dim}"
    major, _ = torch.cuda.get_device_capability(device)
    if major not in (9, 10):  # Hopper (H100, H200) and Blackwell data-centre GPUs (B200): its kernels' targets
        return f"FlashAttention-4 needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x), not {major}.x"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        found = False
    if not found:
        return "FlashAttention-4 needs the flash-attn-4 package (a dependency of cosmos3 on Linux x86-64)"
    return None


@functools.cache  # a failed import raises and is not kept: the next call tries again
def _import() -> Callable:
    # FlashAttention-4 keeps compiled kernels on disk only when asked; a user's own setting wins.
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def preload() -> None:
    """Import FlashAttention-4 in a background thread, so that the checkpoint loads meanwhile (the first call waits
    for it: Python's import lock; an import that fails there fails again, in the caller, at the first call)."""
    global _preload
    with _import_lock:
        if _preload is None:
            _preload = threading.Thread(target=_quiet_import, name="flash-attn-4 import", daemon=True)
            _preload.start()


def _quiet_import() -> None:
    with contextlib.suppress(Exception):  # reported by the first call, which imports again
        _import()


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of q `[N, heads, head_dim]` over k, v `[M, kv_heads, head_dim]` (grouped heads);
    returns `[N, heads * head_dim]`, as `cosmos3.model.layers.attention` does. Inputs need a contiguous last
    dimension only (the projections' views are fine)."""
    # pack_gqa=False: at 720p 47.0 ms against 53.1 with the query heads of a group packed into one tile.
    out = _import()(q[None], k[None], v[None], pack_gqa=False)
    out = out[0] if isinstance(out, tuple) else out  # (output, log-sum-exp) in some versions
    return out[0].flatten(1)


class GenerationAttention:
    """The generation rows' attention with FlashAttention-4 from `min_queries` queries, cuDNN (SDPA) below.

    With `required=False` (`flash_attention="auto"`) a FlashAttention-4 that fails to import (a broken install)
    is reported once as a warning and cuDNN runs every call; with `required=True` that failure is the caller's
    error."""

    def __init__(self, min_queries: int = MIN_QUERIES, required: bool = False):
        self.min_queries, self.required = min_queries, required
        self.loaded = False

    def load(self) -> bool:
        """Whether FlashAttention-4 is importable (imports it the first time)."""
        if not self.loaded:
            try:
                _import()
            except Exception as exc:  # ImportError, or the CUTLASS DSL's own errors loading its libraries
                if self.required:
                    raise RuntimeError(f"FlashAttention-4 failed to load: {type(exc).__name__}: {exc}") from exc
                warnings.warn(
                    f"FlashAttention-4 failed to load ({type(exc).__name__}: {exc}); the generation attention runs "
                    "on cuDNN (flash_attention='auto'; pass flash_attention=False to skip it)",
                    stacklevel=2,
                )
                self.min_queries = sys.maxsize
                return False
            self.loaded = True
        return True

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] >= self.min_queries and self.load():
            return flash_attention(q, k, v)
        return attention(q, k, v)


def use_flash_attention(
    model: torch.nn.Module, device: torch.device, min_queries: int = MIN_QUERIES, required: bool = False
) -> None:
    """Run `model`'s generation attention (`Cosmos3Transformer.generation_attention`) on `device` with
    FlashAttention-4 from `min_queries` queries a branch (`GenerationAttention`). The understanding pathway (a
    prompt once per request, the Reasoner) keeps SDPA."""
    why = available(device, model.dtype, model.config.head_dim)
    if why is not None:
        raise RuntimeError(why)
    dispatch = GenerationAttention(min_queries, required)
    if required:
        dispatch.load()  # asked for by name: a broken install fails the load, not a request later
    else:
        preload()
    model.generation_attention = dispatch
