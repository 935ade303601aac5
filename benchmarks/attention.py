"""The generation attention of one text2video: which SDPA backend runs it, and how fast, with grouped or expanded KV
heads and each memory layout; then FlashAttention-4 (`cosmos3.model.flash_attention`) and the fast path's FP8
attention (`cosmos3.model.fp8_attention`, cuDNN). Nano at 720p: 44,160 queries over 44,460 keys (300 prompt
tokens), 32 query heads on 8 KV heads of 128.

    python benchmarks/attention.py
    python benchmarks/attention.py --preset tiny --size tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from common import SIZES, default_device, latent_shape, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

from cosmos3.config import preset


def milliseconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=300, return_mode="median")
    return 1000 * timed(fn)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--prompt-tokens", type=int, default=300)
    args = parser.parse_args()
    device = default_device()
    cfg = preset(args.preset)
    frames, h, w = latent_shape(args.size)
    q_len = frames * math.ceil(h / cfg.latent_patch_size) * math.ceil(w / cfg.latent_patch_size)
    k_len = q_len + args.prompt_tokens
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    flops = 4 * heads * d * q_len * k_len
    print(f"{q_len} queries over {k_len} keys, {heads} query heads on {kv_heads} KV heads of {d}")
    # [S, H, D] tensors as the model makes them, viewed as [1, H, S, D].
    q = torch.randn(q_len, heads, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(k_len, kv_heads, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(k_len, kv_heads, d, device=device, dtype=torch.bfloat16)
    views = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    contiguous = tuple(t.contiguous() for t in views)
    group = heads // kv_heads
    expanded = (
        contiguous[0],
        contiguous[1].repeat_interleave(group, dim=1),
        contiguous[2].repeat_interleave(group, dim=1),
    )
    reference = F.scaled_dot_product_attention(*contiguous, enable_gqa=True)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for name, tensors, gqa in (
            ("views+gqa", views, True),
            ("contiguous+gqa", contiguous, True),
            ("expanded", expanded, False),
        ):
            try:
                with sdpa_kernel([backend]):
                    fn = lambda t=tensors, gqa=gqa: F.scaled_dot_product_attention(*t, enable_gqa=gqa)
                    out = fn()
                    ms = milliseconds(fn, device)
                err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                print(f"{backend.name:22s} {name:15s} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s  rel.err {err:.1e}")
            except RuntimeError as exc:
                print(f"{backend.name:22s} {name:15s} unsupported: {str(exc).splitlines()[0][:90]}")
    from cosmos3.model import flash_attention as fa

    why = fa.available(device, q.dtype)
    if why is not None:
        print(f"FlashAttention-4        skipped: {why}")
    else:
        # As the model calls it: [S, H, D] in (q a view of a fused projection's output), [S, H * D] out.
        qkv = torch.cat([q.flatten(1), k.flatten(1)[:q_len], v.flatten(1)[:q_len]], dim=1)
        q_view = qkv[:, : heads * d].unflatten(1, (heads, d))
        out = fa.flash_attention(q_view, k, v).unflatten(1, (heads, d)).transpose(0, 1)[None]
        err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        ms = milliseconds(lambda: fa.flash_attention(q_view, k, v), device)
        print(
            f"{'FlashAttention-4':22s} {'view+gqa':15s} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s  rel.err {err:.1e}"
        )
    from cosmos3.model import fp8_attention as fp8

    why = fp8.available()
    if why is not None:
        print(f"FP8 (cuDNN)            skipped: {why}")
        return
    # The fast path's attention as the model calls it: [S, H, D] in, quantization and the bf16 output included.
    out = fp8.fp8_attention(q, k, v).unflatten(1, (heads, d)).transpose(0, 1)[None]
    err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    ms = milliseconds(lambda: fp8.fp8_attention(q, k, v), device)
    print(f"{'FP8 (cuDNN)':22s} {'whole call':15s} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s  rel.err {err:.1e}")
    ms = milliseconds(lambda: fp8.quantize(q) and fp8.quantize(k) and fp8.quantize(v), device)
    print(f"{'FP8 (cuDNN)':22s} {'quantize q,k,v':15s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
