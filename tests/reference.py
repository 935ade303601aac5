"""Helpers that drive the reference (diffusers) implementation on the same inputs as cosmos3."""

from __future__ import annotations

import math

import torch

from cosmos3.loading.checkpoint import weight_files
from cosmos3.loading.components import load_transformer
from cosmos3.loading.config import TransformerConfig
from cosmos3.model.sequence import Packed


def load_ours(folder):
    """Our transformer from a folder written by diffusers' `Cosmos3OmniTransformer.save_pretrained`."""
    cfg = TransformerConfig.from_json(folder / "config.json")
    return load_transformer(cfg, weight_files(folder), "cpu", torch.float32)[0]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights everywhere (norms around 1), so that no path is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 2 and "fc" not in name and "embed" not in name:
                p.copy_(noise * p.shape[1] ** -0.5)
            else:
                p.copy_(noise * 0.05)


def reference_forward(ref, packed: Packed, vision, timestep: int, sound=None, action=None):
    """Call diffusers' Cosmos3OmniTransformer with the index tensors its pipeline would build for `packed`."""
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
