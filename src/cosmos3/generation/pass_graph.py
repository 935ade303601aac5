"""Small denoising passes replayed from a CUDA graph.

A guided pass over a 720p image (2 x 920 generation rows) is ~2,000 kernels (36 layers of a few dozen), many of
them small enough that the host's launches, not the GPU, set the pace. Captured once per request and replayed at
every later step, the pass is one launch: on an H200 a 720p image's step went from 0.0669 to 0.0605 s, and a 256p
video's (2 x 2,880 rows) stayed at 0.201 s (benchmarks/README.md, 2026-12-03 evening). A replayed step also no
longer depends on the host: in a server, HTTP and request reading compete for the GIL with one launch, not 2,000.

A graph belongs to one request (or one batch of requests): it reads the prompts' keys and values (`und_cache`)
where they lie, and its inputs that change from step to step (the noisy latents, the timestep) are copied into the
graph's own buffers before each replay. Replays launch the kernels the eager pass launched, so results are the
eager pass's, bit for bit (tests/test_pass_graph.py checks this on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

# Passes of at most this many generation rows (every branch together) are replayed from a graph on one GPU: a 720p
# image (2 x 920) gains 10%, a 256p video (2 x 2,880) about nothing, and from 480p (2 x 18,720) a layer's GPU work
# is far longer than its launches, while a graph would hold the pass's activations in a memory pool of its own. The
# same bound as `AUTO_COMPILE_ROWS`: passes below it run uncompiled by default, where launches weigh the most.
GRAPH_MAX_ROWS = 8192


class PassGraph:
    """`model.forward_gen` for one set of prompts: the first call runs eagerly (it is also the warm-up that capture
    needs: compiled regions compile, attention kernels and plans are built), the second captures the pass and
    replays it, every later call replays it.

    The model's `between_layers` hook (the server lends the GPU to a waiting conversation there) is not captured: it
    runs once after each replayed pass instead of after every layer. A pass this small is shorter than one layer of
    a 720p pass, so a waiting conversation still gets the GPU within about one unit of work."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.key: tuple | None = None  # the prompts (and cached keys) the graph was made for
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Any] = []
        self.spec = None
        self.outputs: list[Any] = []
        self.out_spec = None
        self.replays = 0  # how many passes came from the graph (tests read it)

    def __call__(self, packs: list, caches: list, *inputs: Any) -> list:
        """`model.forward_gen(packs, caches, *inputs)`; `inputs` are (vision, timestep, sound, action) as it takes
        them. The returned tensors are the caller's (copies of the graph's outputs)."""
        key = tuple(id(p) for p in packs) + tuple(id(c) for c in caches)
        if key != self.key:  # a new batch (e.g. one request of a batch was cancelled): start over
            self.key, self.calls, self.graph = key, 0, None
        self.calls += 1
        if self.calls == 1:
            return self.model.forward_gen(packs, caches, *inputs)
        leaves, spec = tree_flatten(inputs)
        if self.graph is None:
            self._capture(packs, caches, leaves, spec)
        elif spec != self.spec or any(
            isinstance(x, torch.Tensor) and (x.shape != s.shape or x.dtype != s.dtype)
            for x, s in zip(leaves, self.inputs, strict=True)
        ):
            raise ValueError("a captured denoising pass was called with inputs of another structure or shape")
        for buffer, x in zip(self.inputs, leaves, strict=True):
            if isinstance(x, torch.Tensor):
                buffer.copy_(x)
        self.graph.replay()
        self.replays += 1
        if self.model.between_layers is not None:
            self.model.between_layers()
        return tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x for x in self.outputs], self.out_spec)

    def _capture(self, packs: list, caches: list, leaves: list, spec) -> None:
        self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        self.spec = spec
        hook, self.model.between_layers = self.model.between_layers, None  # nothing of another's may be captured
        graph = torch.cuda.CUDAGraph()
        try:
            out = record(graph, lambda: self.model.forward_gen(packs, caches, *tree_unflatten(self.inputs, spec)))
        finally:
            self.model.between_layers = hook
        self.outputs, self.out_spec = tree_flatten(out)
        self.graph = graph


def record(graph: torch.cuda.CUDAGraph, fn: Callable[[], Any]) -> Any:
    """Capture `fn()` into `graph` (its kernels are recorded, not run) and return its outputs, the graph's own.

    On a side stream (capture cannot run on the legacy default stream) that first waits for the work queued so far.
    Not `torch.cuda.graph(...)`: that also synchronises, collects garbage and empties the allocator's cache before
    every capture, ~0.15 s a request that then pays again for every new cudaMalloc. thread_local: a server's other
    threads may use the GPU's allocator meanwhile (request reading)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return out


def graphable(model: torch.nn.Module, rows: int) -> bool:
    """Whether a pass of `rows` generation rows (every branch) runs from a `PassGraph`: the model was set up for it
    (`graph_max_rows`, set on one GPU by `cosmos3.engine.speed_up_generation`) and the pass is small enough."""
    return 0 < rows <= model.graph_max_rows
