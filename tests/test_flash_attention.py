"""FlashAttention-4 for the generation attention (`cosmos3.model.flash_attention`): which calls it takes, the Engine's
switch and its errors on any machine; on a Hopper or Blackwell GPU with flash-attn-4 installed, the kernel against
SDPA and a whole forward against diffusers' transformer."""

from __future__ import annotations

import warnings

import pytest
import torch

import cosmos3
from cosmos3.cli import build_parser
from cosmos3.errors import RequestError
from cosmos3.model import flash_attention as fa
from cosmos3.model.layers import attention

GPU_WHY = fa.available("cuda", torch.bfloat16) if torch.cuda.is_available() else "no CUDA GPU"


def test_generation_attention_takes_flash_from_min_queries(monkeypatch):
    calls = []

    def spy(q, k, v):
        calls.append(q.shape[0])
        return attention(q, k, v) * 2  # distinguishable from the SDPA path's result

    monkeypatch.setattr(fa, "flash_attention", spy)
    monkeypatch.setattr(fa, "_import", lambda: spy)
    dispatch = fa.GenerationAttention(min_queries=16)
    torch.manual_seed(0)
    k, v = torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    for rows in (15, 16, 40):
        q = torch.randn(rows, 4, 8)
        out = dispatch(q, k, v)
        factor = 2 if rows >= 16 else 1
        torch.testing.assert_close(out, factor * attention(q, k, v), atol=0, rtol=0)
    assert calls == [16, 40]


def test_broken_install_warns_once_under_auto_and_fails_when_asked_for(monkeypatch):
    def broken():
        raise ImportError("libcute_dsl_runtime.so: cannot open shared object file")

    monkeypatch.setattr(fa, "_import", broken)
    q, k = torch.randn(8, 4, 8), torch.randn(8, 2, 8)
    auto = fa.GenerationAttention(min_queries=1)
    with pytest.warns(UserWarning, match="FlashAttention-4 failed to load .*cannot open shared object.* cuDNN"):
        out = auto(q, k, k)
    torch.testing.assert_close(out, attention(q, k, k), atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: later calls go straight to SDPA
        auto(q, k, k)
    with pytest.raises(RuntimeError, match="FlashAttention-4 failed to load: ImportError: libcute_dsl"):
        fa.GenerationAttention(min_queries=1, required=True)(q, k, k)


def test_available_says_why_not():
    assert fa.available("cpu", torch.bfloat16) == "FlashAttention-4 needs a CUDA GPU"
    if torch.cuda.is_available():
        assert "bfloat16 or float16, not float32" in fa.available("cuda", torch.float32)
        assert "steps of 8, not 12" in fa.available("cuda", torch.bfloat16, head_dim=12)


def test_engine_flash_attention_switch_and_errors():
    engine = cosmos3.load("tiny", device="cpu")  # auto: nothing to run it on here, SDPA as before
    assert engine.transformer.generation_attention is attention
    engine = cosmos3.load("tiny", device="cpu", flash_attention=False)
    assert engine.transformer.generation_attention is attention
    with pytest.raises(RequestError) as info:
        cosmos3.load("tiny", device="cpu", flash_attention=True)
    assert info.value.field == "flash_attention"
    assert "flash_attention=True is not possible here (FlashAttention-4 needs a CUDA GPU)" in str(info.value)
    with pytest.raises(RequestError) as info:
        cosmos3.load("tiny", device="cpu", flash_attention="fast")
    assert info.value.field == "flash_attention" and "allowed: true, false or 'auto'" in str(info.value)
    with pytest.raises(RequestError) as info:
        cosmos3.load("tiny", device="cpu", flash_attention=True, fp8_attention=True)
    assert info.value.field == "flash_attention" and "with fp8_attention or fast" in str(info.value)


FLAGS = [([], "auto"), (["--flash-attention"], True), (["--flash-attention", "off"], False)]


@pytest.mark.parametrize("flag, value", FLAGS)
def test_cli_flag(flag, value):
    args = build_parser().parse_args(["generate", "--prompt", "x", *flag])
    assert args.flash_attention == value


@pytest.mark.skipif(GPU_WHY is not None, reason=str(GPU_WHY))
def test_engine_runs_flash_attention_by_default_on_a_gpu():
    def attention_of(**switches):
        return cosmos3.load("tiny", device="cuda", **switches).transformer.generation_attention

    default = attention_of()
    assert isinstance(default, fa.GenerationAttention) and default.min_queries == fa.MIN_QUERIES
    assert attention_of(flash_attention=True).min_queries == 0  # every call; imported at load
    assert attention_of(flash_attention=False) is attention


@pytest.mark.skipif(GPU_WHY is not None, reason=str(GPU_WHY))
@pytest.mark.parametrize("queries, keys", [(4096, 4396), (2048, 2059)])
def test_flash_attention_matches_sdpa(queries, keys):
    torch.manual_seed(0)
    heads, kv_heads, d = 32, 8, 128
    qkv = torch.randn(queries, (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : heads * d].unflatten(1, (heads, d))  # a view, as the fused projection makes it
    q[: queries // 2] *= 4  # sharper scores for half the rows, as trained models have
    k = torch.randn(keys, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(keys, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    out = fa.flash_attention(q, k, v)
    assert out.shape == (queries, heads * d) and out.dtype == torch.bfloat16
    exact = attention(q.float(), k.float(), v.float())
    sdpa = attention(q, k, v)
    err = lambda a: ((a.float() - exact).norm() / exact.norm()).item()
    # Two bf16 kernels: both ~2.3e-3 from fp32 on an H200 (benchmarks/attention.py).
    assert err(out) < 2 * err(sdpa) + 1e-3, (err(out), err(sdpa))
    # A wrong head mapping would be far off: each query head's output is its own.
    shuffled = exact.unflatten(1, (heads, d)).roll(1, dims=1).flatten(1)
    assert err(shuffled) > 0.5 and ((out.float() - shuffled).norm() / exact.norm()).item() > 0.5


@pytest.mark.skipif(GPU_WHY is not None, reason=str(GPU_WHY))
def test_forward_with_flash_attention_matches_diffusers(tmp_path, monkeypatch):
    """A whole forward (vision, sound and action rows) in bf16 with FlashAttention-4 on every generation attention
    lands as close to diffusers' fp32 forward as cosmos3's bf16 SDPA forward does."""
    from diffusers import Cosmos3OmniTransformer

    from cosmos3.model.sequence import pack
    from cosmos3.reference import load_ours, randomize, reference_forward

    config = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=300,
        latent_channel=8,
        rope_axes_dim=[16, 8, 8],
        latent_patch_size=2,
        patch_latent_dim=32,
        sound_gen=True,
        sound_dim=6,
        action_gen=True,
        action_dim=12,
    )
    ref = Cosmos3OmniTransformer(**config).eval()
    randomize(ref, seed=5)
    ref.save_pretrained(tmp_path)
    ref = ref.to("cuda")
    ours = load_ours(tmp_path, "cuda", torch.bfloat16)
    cfg = ours.config
    gen = torch.Generator().manual_seed(1)
    t, h, w = 5, 24, 32  # 5 x 12 x 16 = 960 vision rows
    packed = pack(cfg, list(range(1, 12)), (t, h, w), [0], fps=16.0, vae_temporal_compression=4, sound_len=9,
                  action_len=16, action_domain=1, device="cuda")  # fmt: skip
    vision = torch.randn(cfg.latent_channel, t, h, w, generator=gen).cuda()
    sound = torch.randn(cfg.sound_dim, 9, generator=gen).cuda()
    action = torch.randn(16, cfg.action_dim, generator=gen).cuda()
    with torch.no_grad():
        expected = reference_forward(ref, packed, vision, 937, sound, action)
        plain = ours(packed, vision, 937, sound, action)
        fa.use_flash_attention(ours, torch.device("cuda"), min_queries=0)
        calls = []
        flash = fa.flash_attention
        monkeypatch.setattr(fa, "flash_attention", lambda q, k, v: calls.append(q.shape[0]) or flash(q, k, v))
        got = ours(packed, vision, 937, sound, action)
    assert len(calls) == cfg.num_hidden_layers
    for name, e, p, g in zip(("vision", "sound", "action"), expected, plain, got, strict=True):
        err_flash, err_sdpa = (((x.float() - e).norm() / e.norm()).item() for x in (g, p))
        assert err_flash < 2 * err_sdpa + 2e-3, (name, err_flash, err_sdpa)
