"""Layerwise offload: the transformer layers live in pinned CPU memory and are copied to the GPU a layer or two
ahead of use on a side stream, so the copy of layer i+1 overlaps the compute of layer i. GPU memory then holds the
embeddings, heads and `ahead + 1` layers instead of all of them (the weights of one Nano layer are ~0.5 GiB in bf16
of ~16 GiB), for every pass: the denoiser's, the prompt cache's and the Reasoner's.

It works by position: the model reads its layers in order (`for layer in self.layers`, `self.layers[i]`), so a
`ModuleList` that loads on access knows what comes next.
"""

from __future__ import annotations

import torch
from torch import nn


class OffloadedLayers(nn.ModuleList):
    """`model.layers` whose parameters stay on the CPU, pinned, except the layers in use and `ahead` after them."""

    def setup(self, device: torch.device, ahead: int = 1, resident: int = 0) -> None:
        self.device, self.ahead, self.resident = device, ahead, resident
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: list[dict[str, torch.Tensor]] = []
        for index, layer in enumerate(nn.ModuleList.__iter__(self)):  # not our __iter__: it would load each layer
            pinned = {}
            if index < resident:  # stays on the GPU for good
                layer.to(device)
                self.host.append(pinned)
                continue
            for name, param in layer.named_parameters():
                if param.is_meta:  # a pathway this engine does not load (e.g. generation, Reasoner only)
                    continue
                host = param.data.to("cpu")
                pinned[name] = host.pin_memory() if self.stream is not None else host
                param.data = pinned[name]
            self.host.append(pinned)
        self.ready: dict[int, torch.cuda.Event | None] = {}  # layer -> copy finished (None: on the CPU path)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError("an offloaded layer list is read one layer at a time")
        i = index % len(self)
        if i < self.resident:
            if i == 0:  # a new pass: the first streamed layers travel while the resident ones compute
                for j in range(self.resident, min(len(self), self.resident + self.ahead + 1)):
                    self._fetch(j)
            return nn.ModuleList.__getitem__(self, i)
        for j in range(self.ahead + 1):  # this layer and the next `ahead`, wrapping to the next pass
            if (i + j) % len(self) >= self.resident:
                self._fetch((i + j) % len(self))
        event = self.ready[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for j in list(self.ready):  # layers behind the window go back to their pinned host copies
            if (j - i) % len(self) > self.ahead:
                self._release(j)
        return nn.ModuleList.__getitem__(self, i)

    def _fetch(self, i: int) -> None:
        if i in self.ready:
            return
        layer = nn.ModuleList.__getitem__(self, i)
        if self.stream is None:
            for name, param in layer.named_parameters():
                if name in self.host[i]:
                    param.data = self.host[i][name].to(self.device)
            self.ready[i] = None
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # the memory it reuses must be free of earlier work
        with torch.cuda.stream(self.stream):
            for name, param in layer.named_parameters():
                if name not in self.host[i]:
                    continue
                gpu = self.host[i][name].to(self.device, non_blocking=True)
                gpu.record_stream(compute)  # used on the compute stream: not reused before that work ends
                param.data = gpu
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[i] = event

    def _release(self, i: int) -> None:
        layer = nn.ModuleList.__getitem__(self, i)
        for name, param in layer.named_parameters():
            if name in self.host[i]:
                param.data = self.host[i][name]
        del self.ready[i]


def offload_layers(model: nn.Module, device: torch.device, ahead: int = 1, resident: int = 0) -> None:
    """Everything but the layers moves to `device`; the layers become an `OffloadedLayers` in pinned host memory,
    streamed to `device` as they are used, except the first `resident` layers, which stay on `device`."""
    for name, param in model.named_parameters():
        if not name.startswith("layers.") and not param.is_meta:
            param.data = param.data.to(device)
    model.layers.__class__ = OffloadedLayers
    model.layers.setup(device, ahead, resident)
