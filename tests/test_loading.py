"""Checkpoint loading: reference-written folders, shards, key names, dtypes and the errors users see."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer, UniPCMultistepScheduler
from safetensors.torch import load_file, save_file

import cosmos3
from cosmos3.loading.checkpoint import CheckpointError
from cosmos3.loading.tiny import build_tokenizer, write_pipeline
from cosmos3.reference import randomize


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A folder written by diffusers' own `Cosmos3OmniPipeline.save_pretrained`, transformer split into shards."""
    transformer = Cosmos3OmniTransformer(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=12,
        vocab_size=300,
        latent_channel=16,
        patch_latent_dim=64,
        rope_axes_dim=[2, 2, 2],
    )
    randomize(transformer, seed=2)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.1] * 16,
        latents_std=[1.5] * 16,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = Cosmos3OmniPipeline(
        transformer=transformer,
        text_tokenizer=build_tokenizer(),
        vae=vae,
        scheduler=scheduler,
        enable_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("reference-saved")
    pipe.save_pretrained(folder, max_shard_size="60KB")
    return folder, pipe


def test_reference_saved_folder_loads_and_matches(reference_folder):
    folder, pipe = reference_folder
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1, "expected a sharded transformer"
    engine = cosmos3.load(folder)
    for name, p in engine.transformer.named_parameters():
        torch.testing.assert_close(p, pipe.transformer.state_dict()[name], atol=0, rtol=0)
    ref = pipe(
        prompt="a cup",
        num_frames=5,
        height=32,
        width=48,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(4),
        output_type="latent",
    )
    ours = engine.generate(
        mode="text2video",
        prompt="a cup",
        num_frames=5,
        height=32,
        width=48,
        num_steps=3,
        guidance=5.0,
        seed=4,
        fps=24,
        progress=False,
    )
    torch.testing.assert_close(ours.latents, ref.video, atol=1e-4, rtol=0)


def test_sharded_tiny_matches_single_file(tmp_path):
    single = cosmos3.load(write_pipeline(tmp_path / "single", seed=1))
    sharded_folder = write_pipeline(tmp_path / "sharded", seed=1, max_shard_tensors=7)
    assert (sharded_folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = cosmos3.load(sharded_folder)
    for (name, a), (_, b) in zip(
        single.transformer.named_parameters(), sharded.transformer.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def _transformer_file(folder):
    return folder / "transformer" / "diffusion_pytorch_model.safetensors"


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    folder = write_pipeline(tmp_path / "p")
    weights = load_file(_transformer_file(folder))
    weights.pop("layers.1.mlp.up_proj.weight")
    weights["layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(weights, _transformer_file(folder))
    with pytest.raises(CheckpointError) as err:
        cosmos3.load(folder)
    assert "layers.1.mlp.up_proj.weight" in str(err.value)
    assert "layers.0.self_attn.surprise.weight" in str(err.value)


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder = write_pipeline(tmp_path / "p")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers\.\d+\.mlp\.\w+\.weight in .* has shape"):
        cosmos3.load(folder)


def test_vision_tower_keys_are_kept_for_the_reasoner(tmp_path):
    folder = write_pipeline(tmp_path / "p", with_vision=False)
    weights = load_file(_transformer_file(folder))
    weights["blocks.0.attn.qkv.weight"] = torch.randn(6, 2)
    weights["model.visual.merger.norm.weight"] = torch.randn(4)
    save_file(weights, _transformer_file(folder))
    engine = cosmos3.load(folder)
    assert set(engine.vision_weights) == {"blocks.0.attn.qkv.weight", "merger.norm.weight"}


def test_bf16_load_keeps_time_embedder_fp32(tmp_path):
    engine = cosmos3.load(write_pipeline(tmp_path / "p"), dtype="bfloat16")
    assert engine.transformer.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert engine.transformer.time_embedder.linear_1.weight.dtype == torch.float32
    result = engine.generate(mode="text2image", prompt="x", num_steps=2, height=32, width=32, progress=False)
    assert result.video.shape == (1, 32, 32, 3)


def test_uncached_hub_id_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot be downloaded here"):
        cosmos3.load("nvidia/Cosmos3-Nano")


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a Cosmos 3 checkpoint folder"):
        cosmos3.load(tmp_path)
