"""The generation attention at 720p (44,160 queries over 44,460 keys, 32 query heads on 8 KV heads of 128):
which SDPA backend runs it, and how fast, with grouped or expanded KV heads and each memory layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


def main() -> None:
    q_len, k_len, heads, kv_heads, d = 44160, 44460, 32, 8, 128
    flops = 4 * heads * d * q_len * k_len
    # [S, H, D] tensors as the model makes them, viewed as [1, H, S, D].
    q = torch.randn(q_len, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(k_len, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(k_len, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    views = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    contiguous = tuple(t.contiguous() for t in views)
    expanded = (contiguous[0], contiguous[1].repeat_interleave(4, dim=1), contiguous[2].repeat_interleave(4, dim=1))
    reference = F.scaled_dot_product_attention(*contiguous, enable_gqa=True)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for name, args, gqa in (
            ("views+gqa", views, True),
            ("contiguous+gqa", contiguous, True),
            ("expanded", expanded, False),
        ):
            try:
                with sdpa_kernel([backend]):
                    fn = lambda args=args, gqa=gqa: F.scaled_dot_product_attention(*args, enable_gqa=gqa)  # noqa: E731
                    out = fn()
                    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
                err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                print(f"{backend.name:22s} {name:15s} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s  rel.err {err:.1e}")
            except RuntimeError as exc:
                print(f"{backend.name:22s} {name:15s} unsupported: {str(exc).splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
