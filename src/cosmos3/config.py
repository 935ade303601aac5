"""Model configuration: one dataclass mirroring the checkpoint's `transformer/config.json`, plus presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TransformerConfig:
    """The Mixture-of-Transformers denoiser. Field names are the checkpoint's config keys."""

    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936
    hidden_act: str = "silu"  # "silu" (SwiGLU, RMSNorm) or "relu2" (squared ReLU, Nemotron RMSNorm)
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    qk_norm_for_text: bool = True
    use_und_k_norm_for_gen: bool = False
    rope_theta: float = 5_000_000.0
    rope_axes_dim: list[int] = field(default_factory=lambda: [24, 20, 20])  # T/H/W frequency counts
    latent_channel: int = 48
    latent_patch_size: int = 2
    base_fps: int = 24
    enable_fps_modulation: bool = True
    unified_3d_mrope_reset_spatial_ids: bool = True
    unified_3d_mrope_temporal_modality_margin: int = 15000
    timestep_scale: float = 0.001
    sound_gen: bool = False
    sound_dim: int | None = None
    sound_latent_fps: float = 25.0
    action_gen: bool = False
    action_dim: int | None = None
    num_embodiment_domains: int = 32

    def __post_init__(self) -> None:
        if self.hidden_act not in ("silu", "relu2"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; allowed: 'silu', 'relu2'")
        if sum(self.rope_axes_dim) * 2 != self.head_dim:
            raise ValueError(f"rope_axes_dim={self.rope_axes_dim} must sum to head_dim/2={self.head_dim // 2}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sound_gen and self.sound_dim is None:
            raise ValueError("sound_gen=True needs sound_dim")
        if self.action_gen and self.action_dim is None:
            raise ValueError("action_gen=True needs action_dim")

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channel

    @property
    def nemotron_norm(self) -> bool:
        # relu2 backbones (Edge) use the Nemotron RMSNorm everywhere, as the reference does.
        return self.hidden_act == "relu2"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TransformerConfig:
        """Build from a checkpoint config; keys that do not shape the model (`_class_name`, `dtype`) are skipped."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        if values.get("rope_axes_dim") is None:
            rope_scaling = raw.get("rope_scaling") or {}
            values["rope_axes_dim"] = list(rope_scaling.get("mrope_section", [24, 20, 20]))
        values["rope_axes_dim"] = list(values["rope_axes_dim"])
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> TransformerConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_latent_dim"] = self.patch_latent_dim
        return out


PRESETS: dict[str, TransformerConfig] = {
    # A few layers and small widths, every tower on, so that every path runs on a CPU in seconds.
    "tiny": TransformerConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=384,
        rope_axes_dim=[4, 2, 2],
        latent_channel=16,
        sound_gen=True,
        sound_dim=8,
        action_gen=True,
        action_dim=64,
    ),
    # The reference defaults (Qwen3-VL-8B text backbone).
    "nano": TransformerConfig(),
    # Qwen3-VL-32B-class backbone; the published config.json is authoritative when loading a checkpoint.
    "super": TransformerConfig(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8
    ),
    # Nemotron-style dense backbone: squared-ReLU MLP, Nemotron RMSNorm, no text q/k norm.
    "edge": TransformerConfig(
        hidden_size=2048,
        intermediate_size=9216,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=131072,
        hidden_act="relu2",
        rms_norm_eps=1e-5,
        rope_theta=100_000_000.0,
        qk_norm_for_text=False,
        use_und_k_norm_for_gen=True,
    ),
}


def preset(name: str) -> TransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; allowed: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
