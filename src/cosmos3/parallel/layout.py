"""How the processes of one engine are laid out: CFG x Ulysses x tensor parallel, and their process groups.

The world size is the product of the three degrees (seed 001). Ranks are numbered with tensor parallel fastest, then
Ulysses, then CFG, so that the ranks that talk most (TP: two all-reduces per layer) are neighbours, as on one
NVLink island: rank = cfg_index * (ulysses * tp) + ulysses_index * tp + tp_index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cosmos3.errors import RequestError


@dataclass(frozen=True)
class Layout:
    tensor_parallel_size: int = 1
    cfg_parallel_size: int = 1
    ulysses_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "cfg_parallel_size", "ulysses_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(name, value, "a positive integer")
        if self.cfg_parallel_size not in (1, 2):
            raise RequestError("cfg_parallel_size", self.cfg_parallel_size, "1 or 2 (the two CFG branches)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.cfg_parallel_size * self.ulysses_degree

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(cfg index, Ulysses index, TP index) of a global rank."""
        tp, ulysses = self.tensor_parallel_size, self.ulysses_degree
        return rank // (ulysses * tp), (rank // tp) % ulysses, rank % tp

    def rank(self, cfg: int, ulysses: int, tp: int) -> int:
        return (cfg * self.ulysses_degree + ulysses) * self.tensor_parallel_size + tp


@dataclass(eq=False)  # compared by identity (and so usable as a dataclass field default)
class Groups:
    """This process's place in the layout and the process groups it talks in (None where a degree is 1)."""

    layout: Layout
    rank: int = 0
    cfg: dist.ProcessGroup | None = None
    ulysses: dist.ProcessGroup | None = None
    tp: dist.ProcessGroup | None = None

    @property
    def cfg_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def ulysses_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0 owns I/O: it reads requests, writes outputs and answers HTTP; the others follow it."""
        return self.rank == 0


SINGLE = Groups(Layout())


def make_groups(layout: Layout) -> Groups:
    """Create the CFG, Ulysses and TP groups of an initialised default process group. Every rank must call this
    (`new_group` is collective), in the same order."""
    rank = dist.get_rank()
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks; the layout needs {layout.world_size}")
    groups = Groups(layout, rank)
    c, u, t = layout.coords(rank)
    sizes = (layout.cfg_parallel_size, layout.ulysses_degree, layout.tensor_parallel_size)
    for axis, name in enumerate(("cfg", "ulysses", "tp")):
        if sizes[axis] == 1:
            continue
        # One group per line along this axis; this rank keeps the one through its own coordinates.
        others = [range(sizes[i]) if i != axis else [None] for i in range(3)]
        for a in others[0]:
            for b in others[1]:
                for d in others[2]:
                    line = []
                    for k in range(sizes[axis]):
                        point = [a, b, d]
                        point[axis] = k
                        line.append(layout.rank(*point))
                    group = dist.new_group(line)
                    if rank in line:
                        setattr(groups, name, group)
    assert (c, u, t) == layout.coords(groups.rank)
    return groups


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
