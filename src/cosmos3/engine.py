"""`cosmos3.load`: find a checkpoint, load every component once, and serve requests from it."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from cosmos3.checkpoint import CheckpointError, load_weights, weight_files
from cosmos3.config import TransformerConfig
from cosmos3.generator import GenerationResult, Generator
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.request import GenerateRequest

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Smaller defaults for the tiny model so that every command finishes on a CPU in seconds.
TINY_DEFAULTS = {"resolution": "256", "num_frames": 17, "num_steps": 8}


def resolve_path(model: str | Path) -> Path:
    """`"tiny"`, a local pipeline folder, or a hub id already in the local Hugging Face cache."""
    if str(model) == "tiny":
        from cosmos3.tiny import tiny_path

        return tiny_path()
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and not (path / "transformer" / "config.json").is_file():
            raise CheckpointError(
                f"{path} is not a Cosmos 3 checkpoint folder: "
                "it has neither model_index.json nor transformer/config.json"
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


def load_transformer(folder: Path, device: torch.device | str, dtype: torch.dtype) -> tuple[Cosmos3Transformer, dict]:
    """Build the MoT on the meta device and fill it shard by shard; returns it and the vision-tower tensors."""
    cfg = TransformerConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    vision = load_weights(model, weight_files(folder), device, dtype)
    return model.eval().requires_grad_(False), vision


class Engine:
    """A loaded checkpoint. `generate` runs the Generator; one copy of the weights serves every request."""

    def __init__(self, path: Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer

        self.path = path
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        self.transformer, self.vision_weights = load_transformer(path / "transformer", self.device, self.dtype)
        vae = AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=self.dtype).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path / "text_tokenizer")
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        sound = None
        if (path / "sound_tokenizer").is_dir():
            from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

            with warnings.catch_warnings():  # the codec uses torch's legacy weight_norm, which warns on every load
                warnings.simplefilter("ignore", FutureWarning)
                sound = Cosmos3AVAEAudioTokenizer.from_pretrained(path / "sound_tokenizer", torch_dtype=self.dtype)
            sound = sound.to(self.device).eval()
        self.generator = Generator(
            self.transformer,
            vae,
            scheduler_config,
            tokenizer,
            sound,
            default_use_system_prompt=index.get("default_use_system_prompt", True),
            use_native_flow_schedule=index.get("use_native_flow_schedule", False),
        )
        self.defaults = dict(TINY_DEFAULTS) if path.name.startswith("tiny-v") else {}

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.config

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
        return self.generator.generate(self.request(request, **fields), progress=progress, on_step=on_step)


def load(
    model: str | Path = "tiny", device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> Engine:
    """Load `"tiny"`, a local checkpoint folder, or a cached hub id (e.g. `"nvidia/Cosmos3-Nano"`)."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return Engine(resolve_path(model), device=device, dtype=dtype)
