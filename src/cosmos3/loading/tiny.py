"""The built-in `tiny` model: deterministic random weights in the published checkpoint layout.

It is written once to a cache folder and then loaded like any checkpoint, so `cosmos3.load("tiny")` exercises
the real loader. The reference `Cosmos3OmniPipeline.from_pretrained` can load the same folder, which is what
the parity tests do.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import string
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from cosmos3.config import TransformerConfig, preset

TINY_VERSION = "2"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style chat template; list contents (text / image / video parts) are rendered as Qwen3-VL does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tokenizer(vocab_size: int | None = None):
    """A byte-level BPE tokenizer (one token per byte, no merges) with Qwen's special tokens and chat template.

    With `vocab_size` (a benchmark's full-size model), filler tokens " aaaa", " aaab", ... fill the ids up to it, so
    that every id a random model samples decodes to ASCII text; prompts still encode one token per byte (no merges
    reach the fillers), and the special tokens take the last ids, as in Qwen's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    if vocab_size is not None:
        space = "\u0120"  # the byte-level alphabet's character for b" "
        words = ("".join(w) for w in itertools.product(string.ascii_lowercase, repeat=4))
        for word in itertools.islice(words, max(0, vocab_size - len(vocab) - len(SPECIAL_TOKENS))):
            vocab[space + word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_transformer_weights(cfg: TransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights with healthy scales: linears ~ U(+-1/sqrt(fan_in)), norms ~ 1, embeddings ~ N(0, 0.02)."""
    from cosmos3.model.transformer import Cosmos3Transformer

    rng = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    weights = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        module = name.rpartition(".")[0].rpartition(".")[2]
        if "norm" in module:
            w = 1.0 + 0.1 * torch.randn(shape, generator=rng)
        elif len(shape) == 2 and not name.endswith(("fc.weight", "bias.weight", "embed_tokens.weight")):
            bound = shape[1] ** -0.5
            w = (torch.rand(shape, generator=rng) * 2 - 1) * bound
        elif name.endswith("fc.weight"):  # DomainLinear rows: a flattened [in, out] matrix per domain
            fan_in = cfg.action_dim if "proj_in" in name else cfg.hidden_size
            w = (torch.rand(shape, generator=rng) * 2 - 1) * fan_in**-0.5
        else:
            w = 0.02 * torch.randn(shape, generator=rng)
        weights[name] = w.contiguous()
    return weights


def write_pipeline(
    folder: str | Path,
    cfg: TransformerConfig | None = None,
    seed: int = 0,
    max_shard_tensors: int = 0,
    with_vision: bool = True,
    vae_spatial: int = 16,
) -> Path:
    """Write a complete pipeline folder (model_index.json, transformer/, vae/, scheduler/, text_tokenizer/,
    sound_tokenizer/, and for the Reasoner config.json, pre-processor configs and vision weights) with random
    weights. `max_shard_tensors` > 0 splits the transformer into indexed shards. `vae_spatial=8` writes a
    Wan2.1-style VAE (8x spatial, RGB in and out, no pixel patching) instead of Cosmos 3's 16x Wan2.2-style one."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

    cfg = cfg or preset("tiny")
    folder = Path(folder)
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "Cosmos3OmniTransformer", "_diffusers_version": "0.42.1", **cfg.to_dict()}
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    weights = random_transformer_weights(cfg, seed)
    tokenizer = build_tokenizer()
    if with_vision:  # the Reasoner's vision tower lives in the unified checkpoint under flat names
        reasoner_config = write_reasoner_config(folder, cfg, tokenizer)
        weights.update(random_vision_weights(reasoner_config["vision_config"], seed))
    save_shards(weights, folder / "transformer", max_shard_tensors)

    torch.manual_seed(seed)
    z = cfg.latent_channel
    rng = torch.Generator().manual_seed(seed + 1)
    if vae_spatial not in (8, 16):
        raise ValueError(f"vae_spatial={vae_spatial} is not supported; allowed: 8 (Wan2.1-style), 16 (Cosmos 3)")
    # Wan2.2-style (Cosmos 3): 2x2 pixel patches (12 channels) and three 2x downsamples = 16x. Wan2.1-style: RGB
    # pixels and the same three downsamples = 8x. Both compress time 4x (two temporal downsamples).
    wan22 = vae_spatial == 16
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=wan22,
        in_channels=12 if wan22 else 3,
        out_channels=12 if wan22 else 3,
        patch_size=2 if wan22 else None,
        scale_factor_spatial=vae_spatial,
        scale_factor_temporal=4,
        latents_mean=(0.1 * torch.randn(z, generator=rng)).tolist(),
        latents_std=(1.0 + 0.5 * torch.rand(z, generator=rng)).tolist(),
    )
    vae.save_pretrained(folder / "vae")
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=10.0,
        predict_x0=True,
        solver_type="bh2",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.save_pretrained(folder / "scheduler")
    tokenizer.save_pretrained(folder / "text_tokenizer")
    components = {
        "transformer": ["diffusers", "Cosmos3OmniTransformer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "sound_tokenizer": [None, None],
        "safety_checker": [None, None],
    }
    if cfg.sound_gen:
        with warnings.catch_warnings():  # the codec uses torch's legacy weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            sound = Cosmos3AVAEAudioTokenizer(
                vocoder_input_dim=cfg.sound_dim,
                dec_dim=4,
                enc_dim=8,
                enc_latent_dim=2 * cfg.sound_dim,
                encoder_enabled=False,
            )
        sound.save_pretrained(folder / "sound_tokenizer")
        components["sound_tokenizer"] = ["diffusers", "Cosmos3AVAEAudioTokenizer"]
    index = {
        "_class_name": "Cosmos3OmniPipeline",
        "_diffusers_version": "0.42.1",
        "default_use_system_prompt": True,
        "enable_safety_checker": False,
        "use_native_flow_schedule": False,
        **components,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tiny_vision_config(hidden_size: int) -> dict:
    """A two-block Qwen3-VL vision tower (patch 16, merge 2) with DeepStack taps after both blocks."""
    return {
        "model_type": "qwen3_vl_vision",
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
        "hidden_act": "gelu_pytorch_tanh",
    }


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The config.json token-id fields of a transformers `cosmos3_omni` config, read from the tokenizer."""
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


# The tiny model's Qwen3-VL pixel budgets: small, so that tests run in seconds.
TINY_IMAGE_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
TINY_VIDEO_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 256}


def write_reasoner_config(
    folder: Path,
    cfg: TransformerConfig,
    tokenizer,
    vision_config: dict | None = None,
    image_size: dict | None = None,
    video_size: dict | None = None,
) -> dict:
    """Root config.json (transformers `cosmos3_omni`) and Qwen3-VL pre-processor configs: by default the tiny
    vision tower and small pixel budgets; a benchmark passes full-size ones."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    config = {
        "architectures": ["Cosmos3OmniForConditionalGeneration"],
        "model_type": "cosmos3_omni",
        "tie_word_embeddings": False,
        **vision_token_ids(tokenizer),
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.rms_norm_eps,
            "hidden_act": cfg.hidden_act,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": cfg.rope_theta,
                "mrope_section": list(cfg.rope_axes_dim),
                "mrope_interleaved": True,
            },
        },
        "vision_config": vision_config or tiny_vision_config(cfg.hidden_size),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    processor_args = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Qwen2VLImageProcessor(**processor_args, size=image_size or TINY_IMAGE_SIZE).save_pretrained(folder)
    Qwen3VLVideoProcessor(**processor_args, size=video_size or TINY_VIDEO_SIZE).save_pretrained(folder)
    return config


def random_vision_weights(vision_config: dict, seed: int) -> dict[str, torch.Tensor]:
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(seed + 2)
    config = Qwen3VLVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
    model = Qwen3VLVisionModel(config)
    rng = torch.Generator().manual_seed(seed + 3)
    weights = {}
    for name, p in model.state_dict().items():
        scale = 0.1 if p.ndim == 1 else p.shape[-1] ** -0.5 if p.ndim == 2 else 0.05
        base = 1.0 if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name else 0.0
        weights[name] = (base + scale * torch.randn(p.shape, generator=rng)).contiguous()
    return weights


def save_shards(weights: dict[str, torch.Tensor], folder: Path, max_shard_tensors: int = 0) -> None:
    """One `diffusion_pytorch_model.safetensors`, or indexed shards of at most `max_shard_tensors` tensors."""
    names = list(weights)
    if max_shard_tensors <= 0 or len(names) <= max_shard_tensors:
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
        return
    groups = [names[i : i + max_shard_tensors] for i in range(0, len(names), max_shard_tensors)]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        shard = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: weights[k] for k in group}, str(folder / shard))
        weight_map.update(dict.fromkeys(group, shard))
    index = {
        "metadata": {"total_size": sum(w.numel() * w.element_size() for w in weights.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def tiny_path() -> Path:
    """The cached tiny pipeline folder, written on first use (atomically, so concurrent first uses are safe)."""
    root = Path(os.environ.get("COSMOS3_CACHE", Path.home() / ".cache" / "cosmos3"))
    folder = root / f"tiny-v{TINY_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-", dir=root))
    try:
        write_pipeline(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
