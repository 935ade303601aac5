"""Tensor parallelism (Megatron-style): every layer's heads and MLP columns split over the TP ranks.

Query/key/value projections and the MLP's gate/up projections are column-parallel (each rank holds the output rows
of its heads / its slice of the intermediate width); the attention output and MLP down projections are
row-parallel: each rank multiplies its input slice and one all-reduce sums the partial results, two per layer and
pathway. Each rank reads only its slices from the safetensors shards (`slices` below), so no rank ever holds the
whole model.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cosmos3.config import TransformerConfig
from cosmos3.errors import RequestError


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """Which query and key/value heads, and which MLP columns, one TP rank holds."""

    q: tuple[int, int]  # [start, stop) of the query heads
    kv: tuple[int, int]  # [start, stop) of the key/value heads its query heads use
    mlp: tuple[int, int]  # [start, stop) of the intermediate columns


def head_split(cfg: TransformerConfig, tp: int, rank: int) -> HeadSplit:
    nq, nkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if nq % tp or inter % tp:
        raise RequestError(
            "tensor_parallel_size",
            tp,
            f"a divisor of both the query heads ({nq}) and the MLP width ({inter})",
        )
    per_rank, group = nq // tp, nq // nkv  # query heads per rank; query heads per key/value head
    if per_rank % group and group % per_rank:
        raise RequestError(
            "tensor_parallel_size",
            tp,
            f"a split whose query heads per rank ({per_rank}) divide or are divided by the GQA group ({group})",
        )
    q0 = rank * per_rank
    # With more ranks than key/value heads (GQA), ranks share a key/value head: each holds the one its queries use.
    kv0, kv1 = q0 // group, (q0 + per_rank - 1) // group + 1
    return HeadSplit((q0, q0 + per_rank), (kv0, kv1), (rank * inter // tp, (rank + 1) * inter // tp))


def local_config(cfg: TransformerConfig, split: HeadSplit) -> TransformerConfig:
    """The config of one rank's slice: its heads and MLP width; everything else as the full model's."""
    return dataclasses.replace(
        cfg,
        num_attention_heads=split.q[1] - split.q[0],
        num_key_value_heads=split.kv[1] - split.kv[0],
        intermediate_size=split.mlp[1] - split.mlp[0],
    )


class RowParallelLinear(nn.Linear):
    """`x_slice @ W_slice^T`, summed over the TP ranks, plus the bias once."""

    group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def use_row_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Turn every attention-output and MLP-down projection of `model` (on the meta device) row-parallel."""
    for name, module in list(model.named_modules()):
        if re.search(r"\.(to_out|to_add_out|down_proj)$", name) and type(module) is nn.Linear:
            module.__class__ = RowParallelLinear
            module.group = group


# Our parameter name -> (dimension to slice, which part of the split): column-parallel rows, row-parallel columns.
SHARDED = [
    (re.compile(r"\.self_attn\.(to_q|add_q_proj)\.(weight|bias)$"), 0, "q"),
    (re.compile(r"\.self_attn\.(to_k|to_v|add_k_proj|add_v_proj)\.(weight|bias)$"), 0, "kv"),
    (re.compile(r"\.self_attn\.(to_out|to_add_out)\.weight$"), 1, "q"),
    (re.compile(r"\.(mlp|mlp_moe_gen)\.(gate_proj|up_proj)\.weight$"), 0, "mlp"),
    (re.compile(r"\.(mlp|mlp_moe_gen)\.down_proj\.weight$"), 1, "mlp"),
]


def slices(split: HeadSplit, head_dim: int):
    """A function: parameter name -> (dim, start, stop) of this rank's part, or None for a replicated tensor."""

    def rule(key: str) -> tuple[int, int, int] | None:
        for pattern, dim, part in SHARDED:
            if pattern.search(key):
                start, stop = getattr(split, part)
                unit = 1 if part == "mlp" else head_dim
                return dim, start * unit, stop * unit
        return None

    return rule
