"""Starting the processes of a parallel layout: under `torchrun`, or by ourselves with `torch.multiprocessing`.

One command is enough: when the flags ask for more than one process and this one was not started by `torchrun`,
it becomes rank 0 and starts the other ranks itself (one per GPU). Rank 0 owns I/O; every other rank loads its part
of the engine and then follows rank 0: it receives each call rank 0 makes (`Engine._on_all_ranks`) and runs it too,
so that the collectives inside line up, until rank 0 says stop (at its exit).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cosmos3.errors import RequestError
from cosmos3.parallel.collectives import share
from cosmos3.parallel.layout import Groups, Layout, backend_for, make_groups

logger = logging.getLogger(__name__)

# A collective that waits longer than this means a rank died or diverged; fail instead of hanging forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
STOP = "stop"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def check_devices(layout: Layout, device: torch.device) -> None:
    """A layout asking for more GPUs than this machine has is an error naming the flags and the count found."""
    if device.type != "cuda":
        return
    found = torch.cuda.device_count()
    # Under torchrun the ranks may span nodes: each node needs GPUs for its own processes only.
    here = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size)) if under_torchrun() else layout.world_size
    if here > found:
        raise RequestError(
            "tensor_parallel_size x cfg_parallel_size x ulysses_degree",
            f"{layout.tensor_parallel_size} x {layout.cfg_parallel_size} x {layout.ulysses_degree} = "
            f"{layout.world_size}",
            f"at most {found} (the GPUs found)",
            "asks for more processes than there are GPUs",
        )


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses GPU r of this machine (LOCAL_RANK under torchrun); on the CPU every rank uses the CPU."""
    if device.type != "cuda":
        return device
    index = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _init(rank: int, layout: Layout, device: torch.device, address: str, port: int) -> Groups:
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
    dist.init_process_group(backend_for(device), rank=rank, world_size=layout.world_size, timeout=COLLECTIVE_TIMEOUT)
    return make_groups(layout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, layout: Layout, device: torch.device, port: int, build: Callable, kwargs: dict) -> None:
    device = rank_device(device, rank)
    groups = _init(rank, layout, device, "127.0.0.1", port)
    _build_and_follow(build, device, groups, kwargs)
    dist.destroy_process_group()


def _build_and_follow(build: Callable, device: torch.device, groups: Groups, kwargs: dict) -> None:
    try:
        engine = build(device=device, groups=groups, **kwargs)
    except Exception as exc:
        ready(f"{type(exc).__name__}: {exc}")
        return
    if ready(None):
        follow(engine)


def ready(error: str | None) -> bool:
    """Every rank says whether it loaded; all go on only if all did (a rank that failed would otherwise leave the
    others waiting in their first collective). Rank 0 raises the first failure; the others return False."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed and dist.get_rank() == 0:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} could not load the engine: {message}")
    return not failed


def start(layout: Layout, device: torch.device, build: Callable[..., Any], kwargs: dict) -> tuple[Groups, torch.device]:
    """Join (torchrun) or start (spawn) the ranks of `layout`. Returns rank 0's groups and device here; on a
    torchrun follower rank it builds the engine with `build`, follows rank 0, and exits the process when told."""
    check_devices(layout, device)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != layout.world_size:
            raise RequestError(
                "tensor_parallel_size x cfg_parallel_size x ulysses_degree",
                layout.world_size,
                f"{world} (torchrun's --nproc-per-node x nodes)",
                "does not match the processes torchrun started",
            )
        rank = int(os.environ["RANK"])
        device = rank_device(device, rank)
        dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)
        groups = make_groups(layout)
        if not groups.leader:
            _build_and_follow(build, device, groups, kwargs)
            dist.destroy_process_group()
            raise SystemExit(0)
    else:
        port = _free_port()
        context = mp.get_context("spawn")
        children = [
            context.Process(target=_child, args=(r, layout, device, port, build, kwargs), daemon=True)
            for r in range(1, layout.world_size)
        ]
        for child in children:
            child.start()
        _children.extend(children)
        device = rank_device(device, 0)
        groups = _init(0, layout, device, "127.0.0.1", port)
    atexit.register(stop)
    return groups, device


def follow(engine: Any) -> None:
    """A follower rank: run every call rank 0 shares, until it shares STOP."""
    while True:
        message = share(None)
        if message == STOP:
            dist.barrier()  # rank 0 keeps the group up until every rank has read STOP
            return
        name, args, kwargs = message
        try:
            getattr(engine, name)(*args, **kwargs)
        except Exception:  # rank 0 raises the same error to its caller; this rank waits for the next call
            logger.debug("rank %d: %s failed", dist.get_rank(), name, exc_info=True)


_children: list = []  # the ranks this process started


def stop() -> None:
    """On rank 0: release the followers, end the process group and wait for the ranks it started."""
    if dist.is_initialized() and dist.get_rank() == 0:
        try:
            share(STOP)
            dist.barrier()
        except RuntimeError:  # a follower is gone already (it failed to load, or was killed)
            logger.warning("a follower rank had already stopped")
        dist.destroy_process_group()
    while _children:
        _children.pop().join(timeout=60)
    atexit.unregister(stop)


def on_all_ranks(groups: Groups, name: str, *args: Any, **kwargs: Any) -> None:
    """On rank 0 of a parallel layout: tell the followers to run `engine.<name>(*args, **kwargs)` too."""
    if groups.distributed and groups.leader:
        share((name, args, kwargs))
