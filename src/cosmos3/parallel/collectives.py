"""The few collectives the engine needs beyond the model's own: gathering CFG branches, agreeing on cancellation,
and handing requests from the leader (rank 0) to the followers."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_gather_tensors(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[list[torch.Tensor]]:
    """Every rank's `tensors` (same shapes and dtypes on every rank), as one list per rank of the group.
    Sent as one flat buffer, so one collective whatever the count."""
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat.contiguous(), group=group)
    out = []
    for part in parts:
        pieces, start = [], 0
        for t in tensors:
            pieces.append(part[start : start + t.numel()].view_as(t))
            start += t.numel()
        out.append(pieces)
    return out


def leader_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Rank 0's flags on every rank (e.g. which requests its clients cancelled), so all ranks stop together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return [bool(v) for v in t.tolist()]


def share(obj: Any) -> Any:
    """Rank 0's object on every rank (pickled; for requests, not tensors of any size)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
