"""A random-weight pipeline folder of a preset's size (Nano: ~30 GB of bf16) that `cosmos3.load` / `cosmos3 serve`
load like a released checkpoint: Generator (transformer, Wan2.2 VAE, scheduler) and Reasoner (Qwen3-VL vision
tower, processor configs, config.json), written fast.

`cosmos3.loading.tiny.write_pipeline` cannot be used at Nano size: it builds every weight in fp32 on the CPU (60 GB,
minutes), always writes the tiny vision tower and VAE, and its byte-level tokenizer knows ~270 of Nano's 151,936
token ids. Here every tensor is made in bf16 on the GPU (when there is one) and streamed to safetensors shards by a
writer thread while the next shard is made; the tokenizer covers the whole vocabulary, so that every token a random
model samples decodes to text (one streamed chunk per token, which is what a serving benchmark times).

    from checkpoint import write_serving_checkpoint
    write_serving_checkpoint("/dev/shm/nano", "nano")
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from common import SCHEDULE, wan22_vae
from safetensors.torch import save_file

from cosmos3.config import TransformerConfig, preset
from cosmos3.loading.tiny import build_tokenizer, tiny_vision_config, write_reasoner_config

MARKER = "serving-checkpoint.json"  # what was written, so that a finished folder can be reused
SHARD_BYTES = 4 * 2**30
# Qwen3-VL's vision processor settings, with a video pixel budget that keeps an 8-frame 448x448 clip at full size
# (784 vision tokens, as benchmarks/reasoner.py feeds it).
IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 8 * 448 * 448}


def serving_config(name: str) -> TransformerConfig:
    """The preset, without the sound and action towers: the serving benchmark runs text2video and chat only (Nano
    has neither tower; tiny would need the sound codec written too)."""
    return replace(preset(name), sound_gen=False, sound_dim=None, action_gen=False, action_dim=None)


def vision_config(name: str, hidden_size: int) -> dict:
    """The Qwen3-VL vision tower (27 blocks, DeepStack taps after blocks 8, 16, 24) at Nano size; tiny's otherwise."""
    if name == "tiny":
        return tiny_vision_config(hidden_size)
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    full = Qwen3VLVisionConfig(out_hidden_size=hidden_size, deepstack_visual_indexes=[8, 16, 24]).to_dict()
    keys = (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "in_channels",
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "out_hidden_size",
        "num_position_embeddings",
        "deepstack_visual_indexes",
        "hidden_act",
    )
    return {"model_type": "qwen3_vl_vision", **{k: full[k] for k in keys}}


def _random(shape: tuple[int, ...], scale: float, base: float, uniform: bool, gen: torch.Generator, device, dtype):
    if uniform:  # U(-scale, scale)
        return torch.rand(shape, generator=gen, device=device, dtype=dtype).mul_(2).sub_(1).mul_(scale)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(scale).add_(base)


def transformer_tensors(cfg: TransformerConfig, gen: torch.Generator, device) -> Iterator[tuple[str, torch.Tensor]]:
    """Every transformer parameter with the scales of `cosmos3.loading.tiny.random_transformer_weights` (linears
    U(+-1/sqrt(fan_in)), norms ~1, embeddings N(0, 0.02)), made on `device` in bf16 (the time embedder in fp32, as
    the released checkpoints keep it)."""
    from cosmos3.model.transformer import Cosmos3Transformer

    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        dtype = torch.float32 if name.startswith("time_embedder") else torch.bfloat16
        module = name.rpartition(".")[0].rpartition(".")[2]
        if "norm" in module:
            w = _random(shape, 0.1, 1.0, False, gen, device, dtype)
        elif len(shape) == 2 and not name.endswith(("fc.weight", "bias.weight", "embed_tokens.weight")):
            w = _random(shape, shape[1] ** -0.5, 0.0, True, gen, device, dtype)
        elif name.endswith("fc.weight"):  # DomainLinear rows (action towers; not in the serving config)
            fan_in = cfg.action_dim if "proj_in" in name else cfg.hidden_size
            w = _random(shape, fan_in**-0.5, 0.0, True, gen, device, dtype)
        else:
            w = _random(shape, 0.02, 0.0, False, gen, device, dtype)
        yield name, w


def vision_tensors(config: dict, gen: torch.Generator, device) -> Iterator[tuple[str, torch.Tensor]]:
    """The vision tower's tensors under the unified checkpoint's flat names (blocks.*, merger.*, ...), with the
    scales of `cosmos3.loading.tiny.random_vision_weights`, in bf16."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    with torch.device("meta"):
        model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    for name, p in model.state_dict().items():
        scale = 0.1 if p.ndim == 1 else p.shape[-1] ** -0.5 if p.ndim == 2 else 0.05
        norm = name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name
        yield name, _random(tuple(p.shape), scale, 1.0 if norm else 0.0, False, gen, device, torch.bfloat16)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, shard_bytes: int = SHARD_BYTES) -> int:
    """Stream tensors into `diffusion_pytorch_model-0000i-of-0000n.safetensors` plus the index; returns the bytes
    written. A writer thread saves one shard while the next is made and copied to the host (at most two shards wait,
    so host memory stays at a few shard sizes)."""
    todo: queue.Queue = queue.Queue(maxsize=2)
    written: list[tuple[str, list[str]]] = []
    errors: list[BaseException] = []

    def writer() -> None:
        while (item := todo.get()) is not None:
            if errors:
                continue
            path, shard = item
            try:
                save_file(shard, str(path))
            except BaseException as exc:  # reported by the caller once the producer stops
                errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        path = folder / f"part-{len(written):05d}.safetensors"
        written.append((path.name, list(shard)))
        todo.put((path, shard))
        shard, size = {}, 0

    try:
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                flush()
            shard[name] = tensor.cpu().contiguous()
            size += nbytes
            total += nbytes
            if errors:
                break
        if shard:
            flush()
    finally:
        todo.put(None)
        thread.join()
    if errors:
        raise errors[0]
    # The shard count is known only now: rename to the Hugging Face pattern and write the index.
    weight_map = {}
    for i, (tmp_name, names) in enumerate(written, start=1):
        final = f"diffusion_pytorch_model-{i:05d}-of-{len(written):05d}.safetensors"
        (folder / tmp_name).rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_serving_checkpoint(
    folder: str | Path, name: str = "nano", device: str | torch.device | None = None, seed: int = 0
) -> dict:
    """Write (or reuse, when `folder` holds a finished one of the same preset and seed) a pipeline folder with
    random weights; returns what was written: preset, bytes, seconds, reused."""
    from diffusers import UniPCMultistepScheduler

    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("preset") == name and info.get("seed") == seed:
            return {**info, "reused": True}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    cfg = serving_config(name)
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "Cosmos3OmniTransformer", "_diffusers_version": "0.42.1", **cfg.to_dict()}
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = build_tokenizer(cfg.vocab_size)  # every id a random model samples decodes to text
    tokenizer.save_pretrained(folder / "text_tokenizer")
    vision = vision_config(name, cfg.hidden_size)
    write_reasoner_config(folder, cfg, tokenizer, vision, IMAGE_SIZE, VIDEO_SIZE)

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        tensors = itertools.chain(transformer_tensors(cfg, gen, device), vision_tensors(vision, gen, device))
        total = write_shards(tensors, folder / "transformer")
        # Initialised on the device (fast), saved from the host.
        vae = wan22_vae(device, latent_channels=cfg.latent_channel, full=name != "tiny").cpu()
        vae.save_pretrained(folder / "vae")
        total += sum(p.numel() * p.element_size() for p in vae.parameters())
        del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    UniPCMultistepScheduler.from_config(SCHEDULE).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "Cosmos3OmniPipeline",
        "_diffusers_version": "0.42.1",
        "default_use_system_prompt": True,
        "enable_safety_checker": False,
        "use_native_flow_schedule": False,
        "transformer": ["diffusers", "Cosmos3OmniTransformer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "sound_tokenizer": [None, None],
        "safety_checker": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    info = {
        "preset": name,
        "seed": seed,
        "bytes": total,
        "gib": round(total / 2**30, 2),
        "write_s": round(time.perf_counter() - start, 1),
        "made_on": str(device),
    }
    marker.write_text(json.dumps(info))  # last: a folder cut off mid-write is never reused
    return {**info, "reused": False}
