"""FP8 attention (`cosmos3.model.fp8_attention`): the per-tensor quantization on any device, cuDNN's kernel against
bf16 SDPA on a Hopper GPU, and the Engine's errors where it cannot run."""

import pytest
import torch
import torch.nn.functional as F

from cosmos3.errors import RequestError
from cosmos3.model import fp8_attention as fp8


def test_quantize_keeps_e4m3_precision_and_uses_its_range():
    torch.manual_seed(0)
    t = torch.randn(512, 8, 64) * 3.0
    q8, descale = fp8.quantize(t)
    assert q8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert q8.float().abs().max().item() == fp8.FP8_MAX  # the largest entry lands on e4m3's largest value
    back = q8.float() * descale.reshape(())
    err = ((back - t).norm() / t.norm()).item()
    assert 0 < err < 0.04  # e4m3 keeps 3 mantissa bits: ~2-3% RMS, never exact for random data


def test_graph_cache_keeps_the_most_recent_shapes(monkeypatch):
    monkeypatch.setattr(fp8, "_graphs", type(fp8._graphs)())
    monkeypatch.setattr(fp8, "MAX_GRAPHS", 3)
    for n in range(5):
        fp8._remember(("shape", n), (n,))
    assert list(fp8._graphs) == [("shape", 2), ("shape", 3), ("shape", 4)]
    fp8._graphs.move_to_end(("shape", 2))  # a hit, as `_graph` makes it
    fp8._remember(("shape", 5), (5,))
    assert list(fp8._graphs) == [("shape", 4), ("shape", 2), ("shape", 5)]


def test_fp8_attention_is_refused_where_it_cannot_run():
    import cosmos3

    with pytest.raises(RequestError) as info:  # the CPU: on any machine
        cosmos3.load("tiny", device="cpu", fp8_attention=True)
    assert info.value.field == "fp8_attention"
    assert "is not possible here (FP8 attention needs a CUDA device); allowed: false" in str(info.value)


@pytest.mark.skipif(fp8.available() is not None, reason=str(fp8.available()))
@pytest.mark.parametrize("queries, keys", [(4096, 4396), (1000, 1037)])
def test_fp8_attention_matches_bf16_sdpa(queries, keys):
    torch.manual_seed(0)
    heads, kv_heads, d = 32, 8, 128
    q = torch.randn(queries, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(keys, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(keys, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    # Sharper scores than randn's: some rows attend to a few keys, as trained models do.
    q[: queries // 2] *= 4
    ref = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), enable_gqa=True)
    ref = ref[0].transpose(0, 1).flatten(1).float()
    out = fp8.fp8_attention(q, k, v)
    assert out.shape == (queries, heads * d) and out.dtype == torch.bfloat16
    err = ((out.float() - ref).norm() / ref.norm()).item()
    # e4m3 inputs, probabilities and output: 0.060 for randn queries and 0.102 with these sharper ones on an H200
    # (benchmarks/results/2026-12-02-h200-attention-fp8.log); bf16 SDPA lands ~5e-4 from fp32.
    assert err < 0.15, err
    # A wrong head mapping or scale would be far off: each query head's output is its own.
    shuffled = ref.unflatten(1, (heads, d)).roll(1, dims=1).flatten(1)
    assert ((out.float() - shuffled).norm() / ref.norm()).item() > 0.5
