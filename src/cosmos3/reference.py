"""The reference implementation run on our packed inputs: the oracle the parity tests and benchmarks compare against,
and that users can check their own checkpoints with.

    ours = load_ours(folder)                  # or any loaded Cosmos3Transformer (one process, no tensor parallel)
    ref = reference_transformer(ours)         # diffusers' Cosmos3OmniTransformer on the same weight tensors
    expected = reference_forward(ref, packed, vision, timestep)
    got = ours(packed, vision, timestep)

`randomize` gives any model (ours, diffusers', transformers') deterministic random weights of a trained model's
scale; `random_weights` makes the same values one tensor at a time (benchmarks build models too large to hold twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from cosmos3.config import TransformerConfig
from cosmos3.loading.checkpoint import weight_files
from cosmos3.loading.components import load_transformer
from cosmos3.model.sequence import Packed
from cosmos3.model.transformer import Cosmos3Transformer


def random_weights(
    shapes: Iterable[tuple[str, Sequence[int]]], device: str | torch.device = "cpu", seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic fp32 weights at a trained model's scale for (name, shape) pairs, one tensor at a time, drawn in
    the given order from one generator on `device`: norms near 1, matrices with unit-variance outputs, small
    vectors, embeddings and per-domain (flattened) matrices. The same names and shapes in the same order give the
    same values, so every rank of a parallel layout makes the same full tensors (and cuts its slices from them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes:
        noise = torch.randn(tuple(shape), generator=gen, device=device)
        if "norm" in name:
            yield name, 1.0 + 0.1 * noise
        elif len(shape) == 2 and "fc" not in name and "embed" not in name:
            yield name, noise * shape[1] ** -0.5
        else:
            yield name, 0.05 * noise


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter of `model` (ours, diffusers' or transformers') in place with `random_weights`, drawn on
    the model's device and cast to each parameter's dtype, so that no path is trivially zero."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    with torch.no_grad():
        for name, value in random_weights(((k, p.shape) for k, p in params.items()), device, seed):
            params[name].copy_(value)


def load_ours(folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Cosmos3Transformer:
    """Our transformer from a folder written by diffusers' `Cosmos3OmniTransformer.save_pretrained`."""
    folder = Path(folder)
    cfg = TransformerConfig.from_json(folder / "config.json")
    return load_transformer(cfg, weight_files(folder), device, dtype)[0]


def reference_transformer(model: Cosmos3Transformer):
    """diffusers' `Cosmos3OmniTransformer` of `model`'s config on `model`'s own weight tensors (no copy; dtypes
    kept). For a model of one process: under tensor parallelism each rank holds only slices."""
    from diffusers import Cosmos3OmniTransformer

    cfg = model.config
    with torch.device("meta"):
        ref = Cosmos3OmniTransformer(**cfg.to_dict())  # our config keys are the checkpoint keys
    ref.load_state_dict(model.state_dict(), assign=True, strict=True)
    # The one buffer, computed at init (on the meta device here): rebuild it where the weights are.
    device = model.proj_in.weight.device
    ref.rotary_emb.inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim)
    )
    return ref.eval()


def reference_forward(ref, packed: Packed, vision, timestep: int, sound=None, action=None):
    """Call diffusers' Cosmos3OmniTransformer with the index tensors its pipeline would build for `packed`.

    Same arguments and returns as `Cosmos3Transformer.forward`: velocities (vision, sound or None, action or None)."""
    cfg = ref.config
    dev = vision.device
    arange = lambda a, b: torch.arange(a, b, device=dev)
    full = lambda n: torch.full((n,), timestep, device=dev)
    und = packed.und_len
    t, h, w = packed.vision_grid
    per_frame = packed.vision_tokens_per_frame
    nv = t * per_frame
    noisy = packed.vision_noisy_frames
    mse = torch.cat(
        [arange(und + f * per_frame, und + (f + 1) * per_frame) for f in noisy.tolist()]
        or [torch.zeros(0, dtype=torch.long, device=dev)]
    )
    kwargs = dict(
        input_ids=packed.input_ids,
        text_indexes=arange(0, und),
        position_ids=packed.position_ids,
        und_len=und,
        sequence_length=packed.seq_len,
        vision_tokens=[vision[None]],
        vision_token_shapes=[(t, math.ceil(h / cfg.latent_patch_size), math.ceil(w / cfg.latent_patch_size))],
        vision_sequence_indexes=arange(und, und + nv),
        vision_mse_loss_indexes=mse,
        vision_timesteps=full(len(noisy) * per_frame),
        vision_noisy_frame_indexes=[noisy],
    )
    offset = und + nv
    if sound is not None:
        n = packed.sound_len
        kwargs.update(
            sound_tokens=[sound],
            sound_token_shapes=[(n, 1, 1)],
            sound_sequence_indexes=arange(offset, offset + n),
            sound_mse_loss_indexes=arange(offset, offset + n),
            sound_timesteps=full(n),
            sound_noisy_frame_indexes=[arange(0, n)],
        )
        offset += n
    if action is not None:
        n = packed.action_len
        a_noisy = packed.action_noisy_frames
        idx = arange(offset, offset + n)
        kwargs.update(
            action_tokens=[action],
            action_token_shapes=[(n, 1, 1)],
            action_sequence_indexes=idx,
            action_mse_loss_indexes=idx[a_noisy],
            action_timesteps=full(len(a_noisy)),
            action_noisy_frame_indexes=[a_noisy],
            action_domain_ids=[torch.tensor([packed.action_domain], device=dev)],
        )
    out = ref(**kwargs, return_dict=False)
    v_vision = out[0][0][0]
    v_sound = out[1][0] if out[1] is not None else None
    v_action = out[2][0] if out[2] is not None else None
    return v_vision, v_sound, v_action
