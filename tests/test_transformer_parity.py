"""The MoT forward against diffusers' Cosmos3OmniTransformer on identical weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import Cosmos3OmniTransformer

from cosmos3.model.sequence import pack
from cosmos3.reference import load_ours, randomize, reference_forward

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=300,
    latent_channel=8,
    rope_axes_dim=[4, 2, 2],
    sound_gen=True,
    sound_dim=6,
    action_gen=True,
    action_dim=12,
)

CONFIGS = {
    "silu-qknorm-p2": dict(latent_patch_size=2, patch_latent_dim=32),
    "relu2-edge-p1": dict(
        hidden_act="relu2",
        qk_norm_for_text=False,
        use_und_k_norm_for_gen=True,
        latent_patch_size=1,
        patch_latent_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=1e8,
    ),
    "silu-noqknorm-bias": dict(
        qk_norm_for_text=False,
        attention_bias=True,
        latent_patch_size=2,
        patch_latent_dim=32,
        enable_fps_modulation=False,
    ),
    "silu-und-k-norm-ignored": dict(use_und_k_norm_for_gen=True, latent_patch_size=2, patch_latent_dim=32),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    ref = Cosmos3OmniTransformer(**BASE, **CONFIGS[request.param]).eval()
    randomize(ref, seed=hash(request.param) % 1000)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    ours = load_ours(folder)
    return ref, ours


CASES = {
    # name: (latent T, h, w, clean vision frames, sound frames, action (domain id, clean action steps) or None)
    "vision-odd": (3, 5, 7, [], 0, None),
    "vision-partly-clean": (4, 6, 4, [0, 1], 0, None),
    "vision-image": (1, 4, 6, [], 0, None),
    "vision-sound": (3, 4, 4, [], 9, None),
    "vision-action-policy-droid": (5, 4, 6, [0], 0, (8, [])),
    "vision-action-forward-av": (5, 3, 4, [0], 0, (1, list(range(16)))),
    "vision-action-inverse-hand": (5, 4, 4, [0, 1, 2, 3, 4], 0, (3, [])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_diffusers(models, case):
    ref, ours = models
    cfg = ours.config
    t, h, w, clean, sound_len, action = CASES[case]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (11,), generator=gen).tolist()
    action_len = 16 if action else 0
    packed = pack(
        cfg,
        ids,
        (t, h, w),
        clean,
        fps=16.0,
        vae_temporal_compression=4,
        sound_len=sound_len,
        action_len=action_len,
        action_clean_frames=action[1] if action else None,
        action_domain=action[0] if action else 0,
    )
    vision = torch.randn(cfg.latent_channel, t, h, w, generator=gen)
    sound = torch.randn(cfg.sound_dim, sound_len, generator=gen) if sound_len else None
    act = torch.randn(action_len, cfg.action_dim, generator=gen) if action else None
    timestep = 937
    with torch.no_grad():
        expected = reference_forward(ref, packed, vision, timestep, sound, act)
        got = ours(packed, vision, timestep, sound, act)
    all_clean = {"vision": len(clean) == t, "sound": False, "action": bool(action) and len(action[1]) == action_len}
    for name, e, g in zip(("vision", "sound", "action"), expected, got, strict=True):
        assert (e is None) == (g is None), name
        if e is None:
            continue
        assert e.shape == g.shape, name
        assert (e.abs().max() > 0) != all_clean[name], f"{name}: zero exactly when every frame is clean"
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0, msg=name)
    # Clean frames predict exactly zero velocity.
    if clean:
        assert got[0][:, clean].abs().max() == 0


def test_loads_model_prefixed_and_transformers_names(tmp_path):
    """Older exports prefix keys with `model.`; transformers-style names (q_proj, q_norm) map onto ours."""
    from safetensors.torch import load_file, save_file

    ref = Cosmos3OmniTransformer(**BASE, **CONFIGS["silu-qknorm-p2"]).eval()
    randomize(ref, seed=3)
    ref.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for k, v in weights.items():
        k = k.replace(".self_attn.to_q.", ".self_attn.q_proj.").replace(".self_attn.norm_k.", ".self_attn.k_norm.")
        renamed[("model.language_model." if k.startswith("layers.") else "model.") + k] = v
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    ours = load_ours(tmp_path)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, weights[name], atol=0, rtol=0)


@pytest.mark.parametrize("rows_per_chunk", [32768, 64, 8])  # both branches in one pass; one at a time; MLP chunks
def test_fast_path_matches_reference_per_branch(models, rows_per_chunk):
    """forward_gen (cached prompt keys/values, CFG branches together) equals the reference's separate passes."""
    ref, ours = models
    cfg = ours.config
    gen = torch.Generator().manual_seed(2)
    shape = (3, 5, 6)
    packs = [
        pack(
            cfg,
            torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist(),
            shape,
            [0],
            fps=24.0,
            vae_temporal_compression=4,
            sound_len=7,
            action_len=16,
            action_domain=7,
        )
        for n in (13, 6)
    ]
    vision = torch.randn(cfg.latent_channel, *shape, generator=gen)
    sound = torch.randn(cfg.sound_dim, 7, generator=gen)
    action = torch.randn(16, cfg.action_dim, generator=gen)
    with torch.no_grad():
        caches = [ours.und_cache(p) for p in packs]
        got = ours.forward_gen(packs, caches, vision, 611, sound, action, rows_per_chunk=rows_per_chunk)
        for p, branch in zip(packs, got, strict=True):
            expected = reference_forward(ref, p, vision, 611, sound, action)
            for e, g in zip(expected, branch, strict=True):
                torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nemotron", [False, True], ids=["qwen", "nemotron"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_rms_norm_rounds_as_the_reference_modules_in_bf16(nemotron, device):
    """The norm runs torch's fused rms_norm (one kernel on a GPU); each flavour keeps its reference's roundings:
    Qwen rounds before the weight, Nemotron once at the end. Only the fp32 sum of squares may add in another order,
    which moves an output by at most one bf16 step and rarely."""
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
    from diffusers.models.transformers.transformer_cosmos3 import Cosmos3NemotronRMSNorm

    from cosmos3.model.layers import RMSNorm

    torch.manual_seed(0)
    for dim, shape in ((4096, (64, 4096)), (128, (64, 32, 128))):
        ref = Cosmos3NemotronRMSNorm(dim, eps=1e-6) if nemotron else DiffusersRMSNorm(dim, eps=1e-6)
        ours = RMSNorm(dim, 1e-6, nemotron)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ours.weight.copy_(ref.weight)
        ref, ours = ref.to(device, torch.bfloat16), ours.to(device, torch.bfloat16)
        x = (torch.randn(shape) * 3).to(device, torch.bfloat16)
        with torch.inference_mode():
            expected, got = ref(x), ours(x)
        assert got.dtype == expected.dtype == torch.bfloat16
        off = (got.float() - expected.float()).abs() > 0
        assert off.float().mean() < 1e-3, off.float().mean()
        step = expected.float().abs().clamp_min(1e-3) * 2**-7  # one bf16 rounding step
        assert ((got.float() - expected.float()).abs() <= step).all()
