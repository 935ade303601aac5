"""Finding a checkpoint and loading its weights shard by shard, straight to the target device and dtype."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Checkpoint name -> our name. Covers the published flat layout, older `model.`-prefixed exports and
# transformers' Qwen3-VL names for the same tensors. Applied in order.
RENAMES: list[tuple[str, str]] = [
    (r"^model\.language_model\.", ""),
    (r"^model\.visual\.", ""),
    (r"^model\.", ""),
    (r"\.self_attn\.q_proj\.", ".self_attn.to_q."),
    (r"\.self_attn\.k_proj\.", ".self_attn.to_k."),
    (r"\.self_attn\.v_proj\.", ".self_attn.to_v."),
    (r"\.self_attn\.o_proj\.", ".self_attn.to_out."),
    (r"\.self_attn\.q_norm\.", ".self_attn.norm_q."),
    (r"\.self_attn\.k_norm\.", ".self_attn.norm_k."),
    (r"\.mlp\.fc1\.", ".mlp.up_proj."),  # Edge (transformers names)
    (r"\.mlp\.fc2\.", ".mlp.down_proj."),
]
_RENAMES = [(re.compile(a), b) for a, b in RENAMES]

# The Reasoner's vision tower shares the unified checkpoint; its tensors are kept aside for the Reasoner.
VISION_PREFIXES = ("blocks.", "merger.", "patch_embed.", "pos_embed.", "deepstack_merger_list.")

# Weights only the Generator uses; a Reasoner-only load skips them (the same set transformers drops).
GENERATOR_ONLY = re.compile(
    r"\.add_[qkv]_proj\.|\.to_add_out\.|\.norm_added_[qk]\.|moe_gen|\.k_norm_und_for_gen\.|"
    r"^proj_(in|out)\.|^time_embedder\.|^audio_|^action_"
)

# Modules that stay in fp32 whatever the load dtype (as the reference's `_keep_in_fp32_modules`).
FP32_PREFIXES = ("time_embedder.",)


class CheckpointError(RuntimeError):
    pass


def rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder, in index order when there is an index."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def load_weights(
    model: nn.Module,
    files: list[Path],
    device: torch.device | str,
    dtype: torch.dtype,
    skip: re.Pattern | None = None,
    part: Callable[[str], tuple[int, int, int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Fill `model` (built on the meta device) from `files`, one tensor at a time.

    Every tensor goes straight to `device` in `dtype` (fp32 for FP32_PREFIXES), so no full-precision copy of
    the model is ever held. Vision-tower tensors are returned separately. Missing or unexpected keys raise.
    Tensors whose renamed key matches `skip` are neither loaded nor reported (their parameters stay on the meta
    device and take no memory). `part(key)` -> (dim, start, stop) reads only that slice of a tensor (tensor
    parallelism: each rank reads its heads and columns straight from the file).
    """
    expected = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    vision: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for raw_key in f.keys():
                key = rename(raw_key)
                if key.startswith(VISION_PREFIXES):
                    vision[key] = f.get_tensor(raw_key).to(device=device, dtype=dtype)
                    continue
                if skip is not None and skip.search(key):
                    continue
                if key not in expected:
                    unexpected.append(raw_key)
                    continue
                param = expected[key]
                piece = part(key) if part is not None else None
                if piece is None:
                    tensor = f.get_tensor(raw_key)
                else:
                    dim, start, stop = piece
                    index = (slice(None),) * dim + (slice(start, stop),)
                    tensor = f.get_slice(raw_key)[index]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{raw_key} in {path.name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                target = torch.float32 if key.startswith(FP32_PREFIXES) else dtype
                _set_parameter(model, key, tensor.to(device=device, dtype=target))
                seen.add(key)
    missing = sorted(k for k in expected if k not in seen and not (skip is not None and skip.search(k)))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        raise CheckpointError(
            f"the weights in {files[0].parent} do not match the model config:\n  " + "\n  ".join(lines)
        )
    return vision


def read_tensors(files: list[Path], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `files` under its renamed key (for components kept as plain tensors, e.g. a vision tower)."""
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for raw_key in f.keys():
                out[rename(raw_key)] = f.get_tensor(raw_key).to(device=device, dtype=dtype)
    return out


def _set_parameter(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[name] = nn.Parameter(value, requires_grad=False)
