"""`cosmos3.load`: find a checkpoint, load every component once, and serve requests from it."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cosmos3.checkpoint import GENERATOR_ONLY, CheckpointError, load_weights, read_tensors, weight_files
from cosmos3.config import TransformerConfig
from cosmos3.generator import GenerationResult, Generator
from cosmos3.guardrails import CosmosGuardrail, Guardrail
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.reasoner import Reasoner, Sampling
from cosmos3.request import GenerateRequest, RequestError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SURFACES = ("generator", "reasoner")

# Smaller defaults for the tiny model so that every command finishes on a CPU in seconds.
TINY_DEFAULTS = {"resolution": "256", "num_frames": 17, "num_steps": 8}


def resolve_path(model: str | Path) -> Path:
    """`"tiny"`, a local checkpoint folder, or a hub id already in the local Hugging Face cache."""
    if str(model) == "tiny":
        from cosmos3.tiny import tiny_path

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
    cfg: TransformerConfig, files: list[Path], device, dtype: torch.dtype, generator: bool = True
) -> tuple[Cosmos3Transformer, dict]:
    """Build the MoT on the meta device and fill it shard by shard; returns it and the vision-tower tensors.

    Without `generator` the generation pathway is never read and stays on the meta device (no memory)."""
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    vision = load_weights(model, files, device, dtype, skip=None if generator else GENERATOR_ONLY)
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


def load_processor(path: Path, tokenizer, vision_config: dict):
    """The Qwen3-VL processor: the checkpoint's pre-processor configs, else Qwen3-VL's with Cosmos' mean/std 0.5."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    patch = {
        "patch_size": vision_config.get("patch_size", 16),
        "merge_size": vision_config.get("spatial_merge_size", 2),
        "temporal_patch_size": vision_config.get("temporal_patch_size", 2),
    }
    if (path / "preprocessor_config.json").is_file():
        image_processor = Qwen2VLImageProcessor.from_pretrained(path)
    else:
        image_processor = Qwen2VLImageProcessor(**patch, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if (path / "video_preprocessor_config.json").is_file():
        video_processor = Qwen3VLVideoProcessor.from_pretrained(path)
    else:
        video_processor = Qwen3VLVideoProcessor(**patch, image_mean=[0.5] * 3, image_std=[0.5] * 3)
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


class Engine:
    """A loaded checkpoint. One copy of the weights serves the Generator and the Reasoner."""

    def __init__(
        self,
        path: Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        surfaces: tuple[str, ...] | list[str] = SURFACES,
        fp8: bool = False,
        compile: bool = False,
        guardrails: bool | Guardrail | None = None,
        vae_tiling: bool = False,
    ):
        from transformers import AutoTokenizer

        self.path = path
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.surfaces = tuple(surfaces)
        for surface in self.surfaces:
            if surface not in SURFACES:
                raise ValueError(f"surfaces entry {surface!r} is unknown; allowed: {', '.join(SURFACES)}")
        pipeline_layout = (path / "transformer" / "config.json").is_file()
        root_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if not pipeline_layout and "generator" in self.surfaces:
            raise CheckpointError(
                f"{path} holds only the Reasoner (transformers layout, no transformer/ folder); "
                "load it with surfaces=['reasoner']"
            )
        # Before the weights: a missing guardrail package should fail in a second, not after minutes of loading.
        guardrail = self._load_guardrail(path, guardrails) if "generator" in self.surfaces else None
        if pipeline_layout:
            cfg = TransformerConfig.from_json(path / "transformer" / "config.json")
            files = weight_files(path / "transformer")
        else:
            cfg, files = reasoner_text_config(root_config), weight_files(path)
        self.transformer, vision_weights = load_transformer(
            cfg, files, self.device, self.dtype, generator="generator" in self.surfaces
        )
        if fp8 and "generator" in self.surfaces:  # opt-in: changes results beyond bf16 noise
            from cosmos3.model.fp8 import use_fp8_generation_linears

            use_fp8_generation_linears(self.transformer)
        if compile:
            self.transformer.compile_generation_layers()
        if (path / "vision_encoder").is_dir():
            vision_weights.update(read_tensors(weight_files(path / "vision_encoder"), self.device, self.dtype))
        self.vision_weights = vision_weights
        tokenizer_dir = path / "text_tokenizer" if (path / "text_tokenizer").is_dir() else path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

        self.generator: Generator | None = None
        if "generator" in self.surfaces:
            self.generator = self._load_generator(path, tokenizer)
            self.generator.guardrail = guardrail
            if vae_tiling:  # opt-in: decodes in overlapping tiles, for memory (see benchmarks/README.md)
                self.generator.vae.enable_tiling()
        self.reasoner: Reasoner | None = None
        if "reasoner" in self.surfaces:
            self.reasoner = self._load_reasoner(path, tokenizer, root_config)
        self.defaults = dict(TINY_DEFAULTS) if path.name.startswith("tiny-v") else {}

    def _load_generator(self, path: Path, tokenizer) -> Generator:
        from diffusers import AutoencoderKLWan

        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        vae = AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=self.dtype).to(self.device).eval()
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        sound = None
        if (path / "sound_tokenizer").is_dir():
            from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

            with warnings.catch_warnings():  # the codec uses torch's legacy weight_norm, which warns on every load
                warnings.simplefilter("ignore", FutureWarning)
                sound = Cosmos3AVAEAudioTokenizer.from_pretrained(path / "sound_tokenizer", torch_dtype=self.dtype)
            sound = sound.to(self.device).eval()
        return Generator(
            self.transformer,
            vae,
            scheduler_config,
            tokenizer,
            sound,
            default_use_system_prompt=index.get("default_use_system_prompt", True),
            use_native_flow_schedule=index.get("use_native_flow_schedule", False),
        )

    def _load_guardrail(self, path: Path, guardrails: bool | Guardrail | None) -> Guardrail | None:
        """None follows the checkpoint (model_index.json `enable_safety_checker`, on when absent, as diffusers)."""
        if isinstance(guardrails, Guardrail):
            return guardrails
        if guardrails is None:
            index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
            guardrails = bool(index.get("enable_safety_checker", True))
        return CosmosGuardrail(str(self.device)) if guardrails else None

    def _load_reasoner(self, path: Path, tokenizer, root_config: dict) -> Reasoner:
        vision = processor = None
        vision_config = root_config.get("vision_config")
        if vision_config and self.vision_weights:
            vision = load_vision_tower(vision_config, self.vision_weights, self.device, self.dtype)
            processor = load_processor(path, tokenizer, vision_config)
        elif self.vision_weights:
            logger.warning("vision tower weights found but no vision_config in config.json: the Reasoner is text-only")
        eos = []
        if (path / "generation_config.json").is_file():
            value = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
            eos = value if isinstance(value, list) else [value] if value is not None else []
        return Reasoner(self.transformer, tokenizer, processor, vision, root_config, eos)

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.config

    # ------------------------------------------------------------------------------------------ Generator
    def request(self, request: GenerateRequest | dict | None = None, **fields: Any) -> GenerateRequest:
        """Build and resolve a request from a `GenerateRequest`, a Framework-style dict, or keyword fields."""
        if request is None:
            request = GenerateRequest.from_dict(fields)
        elif isinstance(request, dict):
            request = GenerateRequest.from_dict({**request, **fields})
        elif fields:
            raise TypeError("pass either a GenerateRequest or keyword fields, not both")
        return request.resolved(self.defaults)

    @torch.inference_mode()
    def generate(
        self, request: GenerateRequest | dict | None = None, *, progress: bool = True, on_step=None, **fields: Any
    ) -> GenerationResult:
        """`engine.generate(mode="text2video", prompt="...", ...)`; see `GenerateRequest` for every field."""
        if self.generator is None:
            raise RequestError(
                "mode",
                fields.get("mode", "generate"),
                "reasoning only",
                f"needs the Generator, which this engine did not load (surfaces={list(self.surfaces)})",
            )
        return self.generator.generate(self.request(request, **fields), progress=progress, on_step=on_step)

    @torch.inference_mode()
    def generate_batch(self, requests: list[GenerateRequest | dict]) -> list[GenerationResult]:
        """Several text2image / text2video requests of one shape, schedule and sound setting, denoised in shared
        passes (each keeps its own prompt, seed and guidance; the outputs equal separate runs)."""
        if self.generator is None:
            raise RequestError("mode", "generate", "reasoning only", "needs the Generator, which was not loaded")
        resolved = [self.request(r) if isinstance(r, (GenerateRequest, dict)) else r for r in requests]
        return self.generator.generate_batch(resolved)

    # ------------------------------------------------------------------------------------------ Reasoner
    def _reasoner(self) -> Reasoner:
        if self.reasoner is None:
            raise RequestError("surfaces", list(self.surfaces), "an engine loaded with the reasoner surface")
        return self.reasoner

    @staticmethod
    def _split(kwargs: dict) -> tuple[Sampling, dict]:
        encode = {k: kwargs.pop(k) for k in ("reasoning", "video_fps", "video_num_frames") if k in kwargs}
        try:
            return Sampling(**kwargs), encode
        except TypeError as exc:
            raise RequestError("reason", sorted(kwargs), f"the Sampling fields ({exc})") from exc

    def reason(self, messages: list[dict] | str, **kwargs: Any) -> str:
        """Reply to one conversation (OpenAI / Qwen3-VL messages, or a plain prompt string).

        kwargs: max_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, presence_penalty, seed,
        stop, reasoning (append the explicit-reasoning instruction), video_fps / video_num_frames."""
        params, encode = self._split(kwargs)
        return self._reasoner().complete([_as_messages(messages)], params, **encode)[0].text

    def reason_batch(self, conversations: list[list[dict] | str], **kwargs: Any) -> list[str]:
        """Several conversations decoded together in one batch."""
        params, encode = self._split(kwargs)
        return [r.text for r in self._reasoner().complete([_as_messages(m) for m in conversations], params, **encode)]

    def reason_stream(self, messages: list[dict] | str, **kwargs: Any) -> Iterator[str]:
        """Like `reason`, yielding the reply in pieces as it is decoded."""
        params, encode = self._split(kwargs)
        return self._reasoner().stream(_as_messages(messages), params, **encode)


def _as_messages(messages: list[dict] | str) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def load(
    model: str | Path = "tiny",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    surfaces: tuple[str, ...] | list[str] | None = None,
    fp8: bool = False,
    compile: bool = False,
    guardrails: bool | Guardrail | None = None,
    vae_tiling: bool = False,
) -> Engine:
    """Load `"tiny"`, a local checkpoint folder, or a cached hub id (e.g. `"nvidia/Cosmos3-Nano"`).

    `surfaces=["reasoner"]` skips the generation pathway, VAE and audio codec (about half the memory).
    Opt-in speed options (see benchmarks/README.md for their effect on speed and output): `fp8=True` runs the
    generation pathway's matmuls in FP8 (Hopper), `compile=True` torch.compiles the generation layer,
    `vae_tiling=True` decodes the video in tiles to bound memory.
    `guardrails`: None follows the checkpoint (on for released ones: the `cosmos_guardrail` package must be
    installed, or loading fails saying how to get it), False turns them off, or pass your own checker object
    with `check_text(prompt) -> bool` and `check_video(frames) -> frames | None`."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    path = resolve_path(model)
    if surfaces is None:  # everything the folder holds
        surfaces = SURFACES if (path / "transformer" / "config.json").is_file() else ("reasoner",)
    return Engine(
        path,
        device=device,
        dtype=dtype,
        surfaces=surfaces,
        fp8=fp8,
        compile=compile,
        guardrails=guardrails,
        vae_tiling=vae_tiling,
    )
