"""Finding a checkpoint and building its parts: our transformer, transformers' vision tower and processor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cosmos3.config import TransformerConfig
from cosmos3.loading.checkpoint import GENERATOR_ONLY, CheckpointError, load_weights
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.parallel.layout import SINGLE, Groups
from cosmos3.parallel.tensor import head_split, local_config, slices, use_row_parallel
from cosmos3.parallel.ulysses import check_degree

# What `cosmos3.load` reads from a checkpoint, per surface, as `snapshot_download` allow-patterns (fnmatch: `*`
# also matches `/`, so root files are named exactly). Root: the pipeline index and, in the Reasoner (transformers)
# layout, its config, weights, tokenizer, processor configs and chat template.
HUB_FILES: dict[str, tuple[str, ...]] = {
    "common": (
        "model_index.json",
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer*",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "model*.safetensors",
        "model.safetensors.index.json",
        "transformer/*",  # the MoT: its shards hold both pathways, so a reasoner-only load reads them too
        "text_tokenizer/*",
        "vision_encoder/*",
    ),
    "generator": ("vae/*", "scheduler/*", "sound_tokenizer/*"),
    "reasoner": (),
}
SURFACE_NAMES = ("generator", "reasoner")
# The text tokenizer alone (the prompt upsampler counts tokens with it): either layout's tokenizer files.
TOKENIZER_FILES = (
    "config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "text_tokenizer/*",
)


def hub_patterns(surfaces: tuple[str, ...] | list[str] | None) -> list[str]:
    """The allow-patterns for the files `surfaces` need (None: every surface, as `load` then loads all it finds)."""
    wanted = SURFACE_NAMES if surfaces is None else tuple(surfaces)
    for surface in wanted:
        if surface not in SURFACE_NAMES:
            raise ValueError(f"surfaces entry {surface!r} is unknown; allowed: {', '.join(SURFACE_NAMES)}")
    return [*HUB_FILES["common"], *(p for s in SURFACE_NAMES if s in wanted for p in HUB_FILES[s])]


def hub_cache_dir() -> str:
    """The hub cache as huggingface_hub computes it, but from the environment now rather than at its import:
    HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE, which huggingface_hub also honours) read now, not at import."""
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def is_hub_id(model: str | Path) -> bool:
    """`org/name`, where no local folder of that name exists (a folder wins, as before)."""
    text = str(model)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def resolve_path(
    model: str | Path,
    revision: str | None = None,
    surfaces: tuple[str, ...] | list[str] | None = None,
    patterns: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """`"tiny"`, a local checkpoint folder, or a hub id such as `"nvidia/Cosmos3-Nano"`.

    A hub id is fetched with `huggingface_hub.snapshot_download` into the hub cache (HF_HUB_CACHE / HF_HOME),
    only the files `surfaces` need (None: all of them), at `revision` (a branch, tag or commit; default main),
    with HF_TOKEN for gated or private repos; with HF_HUB_OFFLINE=1 only the cache is read. Files already
    cached are not fetched again. `patterns` replaces the surfaces' file list (e.g. `TOKENIZER_FILES`): the
    snapshot then holds only those files and is not checked as a loadable checkpoint."""
    if is_hub_id(model):
        path = _download(str(model), revision, list(patterns) if patterns is not None else hub_patterns(surfaces))
        if patterns is not None:
            return path
        _check_folder(path, f"the snapshot of {model} (revision {revision or 'main'})")
        missing = [d for d in ("vae", "scheduler") if not (path / d).is_dir()]
        wants_generator = surfaces is None or "generator" in surfaces
        if wants_generator and (path / "transformer" / "config.json").is_file() and missing:
            # huggingface_hub returns a cached snapshot as it is when it cannot check it against the hub
            raise CheckpointError(
                f"the cached snapshot of {model} at {path} lacks {', '.join(missing)}/ (a reasoner-only download?)"
                f"{' and HF_HUB_OFFLINE is set' if hub_offline() else ''}: load it once with network access to "
                "fetch the Generator's files, or pass surfaces=['reasoner'] (--surfaces reasoner)"
            )
        return path
    path = Path(model).expanduser()
    if str(model) != "tiny" and not path.exists():
        raise CheckpointError(
            f"model {str(model)!r} is neither 'tiny', an existing folder, nor a hub id like 'nvidia/Cosmos3-Nano'"
        )
    if revision is not None:  # a revision names a hub commit: refusing beats silently loading something else
        raise CheckpointError(f"revision={revision!r} applies to hub ids only; {str(model)!r} is not one")
    if str(model) == "tiny":
        from cosmos3.loading.tiny import tiny_path

        return tiny_path()
    _check_folder(path)
    return path


def _check_folder(path: Path, what: str | None = None) -> None:
    if not (path / "transformer" / "config.json").is_file() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{what or path} is not a Cosmos 3 checkpoint folder: "
            "it has neither transformer/config.json (pipeline layout) nor config.json (Reasoner layout)"
        )


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    offline = hub_offline()
    token = os.environ.get("HF_TOKEN") or None  # None: huggingface_hub's stored login (`hf auth login`), if any
    at = f"{repo_id} (revision {revision or 'main'})"
    elsewhere = (
        f"On a connected machine run `hf download {repo_id}{f' --revision {revision}' if revision else ''}` with "
        f"HF_HOME pointing at a folder you then copy here as HF_HOME, or `--local-dir DIR` and pass DIR as the model."
    )
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                allow_patterns=allow_patterns,
                local_files_only=offline,
                token=token,
            )
        )
    except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
        who = "the account of the token in HF_TOKEN" if token else "your account, then set HF_TOKEN to its token"
        raise CheckpointError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id} with {who} "
            "(a read token from https://huggingface.co/settings/tokens, or `hf auth login`)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id} was not found on the hub, or it is private and "
            + ("the token in HF_TOKEN cannot read it" if token else "no token was given (set HF_TOKEN)")
        ) from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit hash)") from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise CheckpointError(
                f"HF_HUB_OFFLINE is set, so {at} cannot be downloaded here, and the hub cache {cache} does not "
                f"hold it (or only part of it). Unset HF_HUB_OFFLINE to download it, or point HF_HOME at a cache "
                f"that holds it. {elsewhere}"
            ) from exc
        raise CheckpointError(
            f"{at} cannot be downloaded here (the hub is unreachable: {exc.__class__.__name__}) and the hub cache "
            f"{cache} does not hold it. {elsewhere}"
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {at} failed: {exc}") from exc


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
