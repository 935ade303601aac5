"""What the benchmarks share: a model of a preset's size with random bf16 weights, inputs of a size, and timing.

Run a benchmark as `python benchmarks/<name>.py` from the repository root: Python puts this folder on the path, so
`from common import ...` needs no path edits.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch

from cosmos3.config import TransformerConfig, preset
from cosmos3.model.sequence import Packed, pack
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.parallel.layout import SINGLE, Groups
from cosmos3.parallel.tensor import head_split, local_config, slices, use_row_parallel

# name -> (frames, height, width) of the generated video; 189 frames at 24 fps is the documents' default clip.
SIZES = {
    "tiny-smoke": (9, 64, 96),
    "t2i-720p": (1, 720, 1280),
    "256p": (189, 192, 320),
    "480p": (189, 480, 832),
    "720p": (189, 720, 1280),
}
VAE_SPATIAL, VAE_TEMPORAL = 16, 4  # Cosmos 3's Wan2.2-style VAE


def random_value(name: str, shape: torch.Size, device, seed: int = 0) -> torch.Tensor:
    """A trained model's scale: norms near 1, matrices with unit-variance outputs, small vectors. Seeded by the
    parameter's name, so that every rank makes the same full tensor (and slices its part under TP)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if "norm" in name:
        return 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
    if len(shape) == 2:
        return torch.randn(shape, generator=gen, device=device) * shape[1] ** -0.5
    return 0.02 * torch.randn(shape, generator=gen, device=device)


def random_model(name: str, device: str | torch.device, groups: Groups = SINGLE, seed: int = 0):
    """Our transformer of preset `name` with random bf16 weights made on `device`, one tensor at a time (this rank's
    slice under TP, cut from the same full tensor every rank makes)."""
    cfg = preset(name)
    with torch.device("meta"):
        full = dict(Cosmos3Transformer(cfg).named_parameters())
    part = None
    if groups.tp is not None:
        split = head_split(cfg, groups.layout.tensor_parallel_size, groups.tp_rank)
        cfg, part = local_config(cfg, split), slices(split, cfg.head_dim)
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg, groups)
    if groups.tp is not None:
        use_row_parallel(model, groups.tp)
    for key, _ in list(model.named_parameters()):
        value = random_value(key, full[key].shape, device, seed)
        piece = part(key) if part is not None else None
        if piece is not None:
            dim, start, stop = piece
            value = value.narrow(dim, start, stop - start).contiguous()
        dtype = torch.float32 if key.startswith("time_embedder") else torch.bfloat16
        module_name, _, attr = key.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value.to(dtype), requires_grad=False)
    return cfg, model.eval()


def inputs(cfg: TransformerConfig, size: str, device, prompt_tokens: int = 300, seed: int = 0):
    """A packed prompt and noisy vision latents for a text2video (text2image for one frame) of `size`."""
    frames, height, width = SIZES[size]
    latent = ((frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()
    packed: Packed = pack(cfg, ids, latent, [], 24.0, VAE_TEMPORAL, device=device)
    vision = torch.randn((cfg.latent_channel, *latent), generator=gen).to(device)
    return packed, vision


def timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, float, object]:
    """Median seconds over `repeat` runs after one warm-up, and peak GPU memory (GiB) of those runs."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return times[len(times) // 2], peak, out
