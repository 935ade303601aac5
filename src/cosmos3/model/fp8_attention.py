"""Opt-in FP8 (e4m3) attention for the generation pathway, on cuDNN's fused FP8 flash attention (Hopper).

At 720p two thirds of a denoising step is the generation rows' attention (about 44,000 queries over as many keys),
and cuDNN's bf16 kernel, which diffusers uses too, is already near the GPU's bf16 peak; its FP8 kernel does the same
work on the FP8 tensor cores (benchmarks/attention.py measures both). torch's SDPA has no FP8 path (torch 2.11),
so the kernel is reached through cuDNN's own Python frontend (`nvidia-cudnn-frontend`), one graph per shape.

Scales are per tensor and stay on the GPU (no host sync): q, k and v are each divided by amax / 448 before the cast,
the softmax probabilities (at most 1 within a block) are stored times 448, and the output (a convex combination of
v's rows, so at most v's amax) times 448 / amax(v). On Hopper cuDNN writes the output in FP8 too; it comes back to
bf16 with that scale. Changes results beyond bf16 noise, like the FP8 matmuls (`cosmos3.model.fp8`): off unless
asked for.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from cosmos3.model.fp8 import FP8, FP8_MAX  # e4m3 and its largest finite value, as the FP8 matmuls use them

# Built graphs, the most recently used last. The key length follows the prompt's, so a server meets a new shape with
# most new prompts: the oldest graphs go once there are more than this.
MAX_GRAPHS = 64

_lock = threading.Lock()
# (shapes, strides, device) -> (graph, tensors, workspace bytes, handle)
_graphs: OrderedDict[tuple, tuple] = OrderedDict()
_handles: dict[int, object] = {}  # device index -> cuDNN handle


def _remember(key: tuple, entry: tuple) -> tuple:
    """Keep `entry` under `key` as the most recent graph, dropping the oldest beyond MAX_GRAPHS (call with _lock)."""
    _graphs[key] = entry
    _graphs.move_to_end(key)
    while len(_graphs) > MAX_GRAPHS:
        _graphs.popitem(last=False)
    return entry


def available() -> str | None:
    """None when FP8 attention can run here, else why not."""
    if not torch.cuda.is_available():
        return "FP8 attention needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (9, 0):
        return "FP8 attention needs a Hopper GPU or newer (cuDNN's FP8 flash attention)"
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return "FP8 attention needs the nvidia-cudnn-frontend package"
    return None


def _handle(device: torch.device):
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = cudnn.create_handle()
    return _handles[index]


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """cuDNN's [batch, heads, sequence, head_dim] view of a [sequence, heads, head_dim] tensor, without a copy."""
    n, h, d = t.shape
    s_n, s_h, s_d = t.stride()
    return [1, h, n, d], [n * s_n, s_h, s_n, s_d]


def _graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
    import cudnn

    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(), q.device)
    with _lock:
        if key in _graphs:
            _graphs.move_to_end(key)
            return _graphs[key]
        handle = _handle(q.device)
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        tensors = {}
        for name, t in (("q", q), ("k", k), ("v", v)):
            dim, stride = _bhsd(t)
            tensors[name] = graph.tensor(name=name, dim=dim, stride=stride, data_type=e4m3)
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"],
            k=tensors["k"],
            v=tensors["v"],
            descale_q=tensors["descale_q"],
            descale_k=tensors["descale_k"],
            descale_v=tensors["descale_v"],
            descale_s=tensors["descale_s"],
            scale_s=tensors["scale_s"],
            scale_o=tensors["scale_o"],
            generate_stats=False,
            attn_scale=1.0 / math.sqrt(q.shape[-1]),
            name="generation_attention",
        )
        dim, stride = _bhsd(out)
        o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(e4m3)
        for amax, name in ((amax_s, "amax_s"), (amax_o, "amax_o")):  # cuDNN writes them; nothing here reads them
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            tensors[name] = amax
        tensors["o"] = o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        return _remember(key, (graph, tensors, graph.get_workspace_size(), handle))


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` in e4m3 with one scale for the whole tensor, and the descale (amax / 448) as a [1, 1, 1, 1] fp32 tensor.
    The scaling is done in t's dtype (bf16 keeps 8 bits of mantissa, e4m3 3: it adds nothing that counts)."""
    amax = t.abs().amax().float().clamp(min=1e-12)
    descale = (amax / FP8_MAX).reshape(1, 1, 1, 1)
    return (t * (FP8_MAX / amax).to(t.dtype)).to(FP8), descale


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of q `[N, heads, head_dim]` over k, v `[M, kv_heads, head_dim]` (grouped heads), in
    FP8; returns `[N, heads * head_dim]` in q's dtype, as `cosmos3.model.layers.attention` does."""
    import cudnn

    q8, descale_q = quantize(q)
    k8, descale_k = quantize(k)
    v8, descale_v = quantize(v)
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=FP8, device=q.device)
    graph, t, workspace_size, handle = _graph(q8, k8, v8, out)
    # The workspace is the call's own (the allocator's cache makes that cheap): a denoising pass captured in a CUDA
    # graph (`cosmos3.generation.pass_graph`) then owns it, and dropping this graph from the cache frees nothing
    # that a captured pass still writes to.
    workspace = torch.empty(workspace_size, device=q.device, dtype=torch.uint8)
    # Probabilities are at most 1: stored times 448 they use e4m3's whole range. The output is at most amax(v).
    scale_s = torch.full((1, 1, 1, 1), FP8_MAX, dtype=torch.float32, device=q.device)
    pack = {
        t["q"]: q8,
        t["k"]: k8,
        t["v"]: v8,
        t["descale_q"]: descale_q,
        t["descale_k"]: descale_k,
        t["descale_v"]: descale_v,
        t["descale_s"]: 1.0 / scale_s,
        t["scale_s"]: scale_s,
        t["scale_o"]: 1.0 / descale_v,  # 448 / amax(v)
        t["o"]: out,
        t["amax_s"]: torch.empty_like(scale_s),
        t["amax_o"]: torch.empty_like(scale_s),
    }
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute(pack, workspace, handle=handle)
    return (out.to(q.dtype) * descale_v.reshape(()).to(q.dtype)).flatten(1)


def use_fp8_attention(model: torch.nn.Module) -> None:
    """Run `model`'s generation attention (`Cosmos3Transformer.generation_attention`) in FP8. The understanding
    pathway's attention stays exact: it is computed once per request (and serves the Reasoner)."""
    why = available()
    if why is not None:
        raise RuntimeError(why)
    model.generation_attention = fp8_attention
