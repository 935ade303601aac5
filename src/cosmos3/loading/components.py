"""Finding a checkpoint and building its parts: our transformer, transformers' vision tower and processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cosmos3.config import TransformerConfig
from cosmos3.loading.checkpoint import GENERATOR_ONLY, CheckpointError, load_weights
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.parallel.layout import SINGLE, Groups
from cosmos3.parallel.tensor import head_split, local_config, slices, use_row_parallel
from cosmos3.parallel.ulysses import check_degree


def resolve_path(model: str | Path) -> Path:
    """`"tiny"`, a local checkpoint folder, or a hub id already in the local Hugging Face cache."""
    if str(model) == "tiny":
        from cosmos3.loading.tiny import tiny_path

        return tiny_path()
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "transformer" / "config.json").is_file() and not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is not a Cosmos 3 checkpoint folder: "
                "it has neither transformer/config.json (pipeline layout) nor config.json (Reasoner layout)"
            )
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(model), local_files_only=True))
        except Exception as exc:
            raise CheckpointError(
                f"{model} is not in the local Hugging Face cache and cannot be downloaded here. On a connected "
                f"machine run `hf download {model} --local-dir DIR`, copy DIR here and pass its path "
                f"(cosmos3.load('DIR') or --model DIR), or point HF_HOME at a cache that holds it."
            ) from exc
    raise CheckpointError(
        f"model {str(model)!r} is neither 'tiny', an existing folder, nor a hub id like 'nvidia/Cosmos3-Nano'"
    )


def reasoner_text_config(raw: dict) -> TransformerConfig:
    """Our config from a transformers `cosmos3_omni` config.json (Reasoner layout: no generation pathway)."""
    text = raw.get("text_config") or {}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "attention_bias",
        "hidden_act",
    )
    values = {k: text[k] for k in keys if k in text}
    values["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 5_000_000.0))
    values["rope_axes_dim"] = list(rope.get("mrope_section", [24, 20, 20]))
    return TransformerConfig(**values)


def load_transformer(
    cfg: TransformerConfig,
    files: list[Path],
    device,
    dtype: torch.dtype,
    generator: bool = True,
    groups: Groups = SINGLE,
) -> tuple[Cosmos3Transformer, dict]:
    """Build the MoT on the meta device and fill it shard by shard; returns it and the vision-tower tensors.

    Without `generator` the generation pathway is never read and stays on the meta device (no memory). With tensor
    parallelism each rank builds and reads only its heads and MLP columns."""
    part = None
    if groups.tp is not None:
        split = head_split(cfg, groups.layout.tensor_parallel_size, groups.tp_rank)
        cfg, part = local_config(cfg, split), slices(split, cfg.head_dim)
    if groups.ulysses is not None:
        check_degree(groups.layout.ulysses_degree, cfg.num_attention_heads, cfg.num_key_value_heads)
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg, groups)
    if groups.tp is not None:
        use_row_parallel(model, groups.tp)
    vision = load_weights(model, files, device, dtype, skip=None if generator else GENERATOR_ONLY, part=part)
    return model.eval().requires_grad_(False), vision


def load_vision_tower(vision_config: dict, weights: dict[str, torch.Tensor], device, dtype):
    """transformers' Qwen3-VL vision model filled with the checkpoint's `blocks.*`, `merger.*`, ... tensors."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, Qwen3VLVisionRotaryEmbedding

    if vision_config.get("model_type", "qwen3_vl_vision") != "qwen3_vl_vision":
        raise CheckpointError(
            f"vision tower {vision_config.get('model_type')!r} is not supported; supported: "
            "qwen3_vl_vision (Nano, Super)"
        )
    config = Qwen3VLVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        vision = Qwen3VLVisionModel(config)
    expected = set(vision.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"vision tower weights do not match vision_config: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    vision.load_state_dict(weights, assign=True, strict=True)
    vision.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config).to(device)  # its buffer is computed, not stored
    return vision.to(device=device, dtype=dtype).eval().requires_grad_(False)


# Where transformers' `from_pretrained` finds Qwen3-VL processor settings: `processor_config.json` (what
# `ProcessorMixin.save_pretrained` writes in transformers 5, sub-processors nested inside), or the older
# per-processor files.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def load_processor(path: Path, tokenizer, vision_config: dict):
    """The Qwen3-VL processor with the checkpoint's settings, read by transformers' own `from_pretrained` (every
    file of PROCESSOR_FILES, in transformers' order of precedence). No defaults stand in: a checkpoint with a
    vision tower whose processor settings are missing, unreadable or disagree with its vision_config is an error,
    since other sizes or mean/std would give the model wrong pixels and token counts."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise CheckpointError(
            f"{path} has a vision tower but no processor settings: none of {', '.join(PROCESSOR_FILES)} "
            "(save the checkpoint's Qwen3-VL processor with save_pretrained next to config.json)"
        )
    try:
        image_processor = Qwen2VLImageProcessor.from_pretrained(path)
        video_processor = Qwen3VLVideoProcessor.from_pretrained(path)
    except Exception as exc:
        raise CheckpointError(f"the processor settings in {path} cannot be read by transformers: {exc}") from exc
    expected = {
        "patch_size": vision_config.get("patch_size", 16),
        "merge_size": vision_config.get("spatial_merge_size", 2),
        "temporal_patch_size": vision_config.get("temporal_patch_size", 2),
    }
    for name, processor in (("image", image_processor), ("video", video_processor)):
        got = {key: getattr(processor, key, None) for key in expected}
        if got != expected:
            raise CheckpointError(
                f"the {name} processor settings in {path} ({got}) disagree with vision_config ({expected})"
            )
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=template or tokenizer.chat_template,
    )
