"""What the benchmarks share: sizes, a model of a preset's size with random bf16 weights (and diffusers' model on
the same tensors), a VAE, a scheduler config, inputs of a size, and timing.

Run a benchmark as `python benchmarks/<name>.py` from the repository root: Python puts this folder on the path, so
`from common import ...` needs no path edits. Every benchmark runs on the CPU as a smoke test with `--preset tiny`
and the `tiny-smoke` size.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import torch

from cosmos3.config import TransformerConfig, preset
from cosmos3.model.sequence import Packed, pack
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.parallel.layout import SINGLE, Groups
from cosmos3.parallel.tensor import head_split, local_config, slices, use_row_parallel
from cosmos3.reference import random_weights, reference_transformer

# name -> (frames, height, width) of the generated video; 189 frames at 24 fps is the documents' default clip.
SIZES = {
    "tiny-smoke": (9, 64, 96),
    "t2i-720p": (1, 720, 1280),
    "256p": (189, 192, 320),
    "480p": (189, 480, 832),
    "720p": (189, 720, 1280),
}
VAE_SPATIAL, VAE_TEMPORAL = 16, 4  # Cosmos 3's Wan2.2-style VAE

# A flow-matching UniPC schedule like the released checkpoints'.
SCHEDULE = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 10.0,
    "predict_x0": True,
    "solver_type": "bh2",
    "solver_order": 2,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_name(device) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"


def random_model(
    name: str | TransformerConfig,
    device: str | torch.device,
    groups: Groups = SINGLE,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
):
    """Our transformer of preset `name` (or of a config) with random weights (`cosmos3.reference.random_weights`)
    made on `device`, one tensor at a time: this rank's slice under TP, cut from the same full tensor every rank
    makes. `dtype` everywhere but the time embedder (fp32, as in the released checkpoints)."""
    cfg = preset(name) if isinstance(name, str) else name
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
    for key, value in random_weights(((k, p.shape) for k, p in full.items()), device, seed):
        piece = part(key) if part is not None else None
        if piece is not None:
            dim, start, stop = piece
            value = value.narrow(dim, start, stop - start).contiguous()
        module_name, _, attr = key.rpartition(".")
        value = value.to(torch.float32 if key.startswith("time_embedder") else dtype)
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    assert not any(p.is_meta for p in model.parameters()), "a parameter of this rank's model has no full tensor"
    return cfg, model.eval()


def build_models(name: str | TransformerConfig, device, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """`random_model` and diffusers' Cosmos3OmniTransformer on the very same tensors (one copy in memory):
    (config, reference, ours)."""
    cfg, ours = random_model(name, device, seed=seed, dtype=dtype)
    return cfg, reference_transformer(ours), ours


def latent_shape(size: str) -> tuple[int, int, int]:
    """(frames, height, width) of the latents of a video of `size`."""
    frames, height, width = SIZES[size]
    return (frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL


def inputs(
    cfg: TransformerConfig,
    size: str,
    device,
    prompt_tokens: int = 300,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Packed, torch.Tensor]:
    """A packed prompt and noisy vision latents for a text2video (text2image for one frame) of `size`."""
    latent = latent_shape(size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()
    packed: Packed = pack(cfg, ids, latent, [], 24.0, VAE_TEMPORAL, device=device)
    vision = torch.randn((cfg.latent_channel, *latent), generator=gen).to(device, dtype)
    return packed, vision


def wan22_vae(device, latent_channels: int = 48, full: bool = True):
    """diffusers' AutoencoderKLWan in Cosmos 3's Wan2.2 layout (16x spatial, 4x temporal), random bf16 weights:
    full size, or the tiny model's widths (for smoke tests); latents normalised to mean 0, std 1."""
    from diffusers import AutoencoderKLWan

    widths = dict(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    if not full:
        widths = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(
            **widths,
            z_dim=latent_channels,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=VAE_SPATIAL,
            scale_factor_temporal=VAE_TEMPORAL,
            latents_mean=[0.0] * latent_channels,
            latents_std=[1.0] * latent_channels,
        )
    return vae.to(torch.bfloat16).eval()


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


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> None:
    """A Markdown table as the README has them: the first `left` columns are labels, the others right-aligned."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i < left else "---:" for i in range(len(header))) + " |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def save_rows(rows: list[dict], path: str | None) -> None:
    """Write the rows as JSON where the command line asked for it (`--json PATH`)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)


def environment(device) -> dict[str, str]:
    """What a table's numbers were measured on: GPU (or cpu), torch and diffusers versions, and the date."""
    import diffusers

    return {
        "gpu": gpu_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(data: object, path: str | None) -> None:
    """Write `data` to `path` (if given) through a temporary file, so that a run killed mid-write keeps the last
    complete copy: benchmarks that run for minutes call this after every result."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
