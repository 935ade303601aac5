"""Small denoising passes replayed from a CUDA graph (`cosmos3.generation.pass_graph`). On any machine: which passes
take one, the switch, and PassGraph's own logic over a stand-in graph (input buffers refreshed at every replay,
copies handed out, a restart for new prompts, the hook never captured). On a GPU: replayed passes give the eager
passes' latents bit for bit in every mode and attention, with the step cache, in a batch, and with the hook."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

import cosmos3
from cosmos3.engine import speed_up_generation
from cosmos3.generation import pass_graph, sampler
from cosmos3.generation.pass_graph import GRAPH_MAX_ROWS, PassGraph, graphable
from cosmos3.model.flash_attention import available as flash_available

GPU = torch.cuda.is_available()


def test_graphs_are_set_up_on_one_gpu_only():
    engine = cosmos3.load("tiny", device="cpu")
    model = engine.transformer
    assert model.graph_max_rows == 0  # the CPU: never
    cuda = torch.device("cuda")  # nothing runs on it here: the switches only set attributes
    speed_up_generation(model, cuda, flash_attention=False, compile=False, one_gpu=False)
    assert model.graph_max_rows == 0  # a parallel layout or layerwise offload: never
    speed_up_generation(model, cuda, flash_attention=False, compile=False, cuda_graphs=False)
    assert model.graph_max_rows == 0
    speed_up_generation(model, cuda, flash_attention=False, compile=False)
    assert model.graph_max_rows == GRAPH_MAX_ROWS
    assert graphable(model, GRAPH_MAX_ROWS) and not graphable(model, GRAPH_MAX_ROWS + 1)


def test_the_switch_is_checked_and_reaches_the_engine_from_the_cli():
    from cosmos3.cli import _engine_options, build_parser
    from cosmos3.errors import RequestError

    with pytest.raises(RequestError) as info:
        cosmos3.load("tiny", device="cpu", cuda_graphs="off")
    assert info.value.field == "cuda_graphs" and "allowed: true or false" in str(info.value)
    parser = build_parser()
    assert _engine_options(parser.parse_args(["generate", "--prompt", "x"]))["cuda_graphs"] is True
    assert _engine_options(parser.parse_args(["serve", "--no-cuda-graphs"]))["cuda_graphs"] is False
    if GPU:
        assert cosmos3.load("tiny", device="cuda", cuda_graphs=False).transformer.graph_max_rows == 0


class EagerSpy(PassGraph):
    """Records which passes the sampler hands to a graph; runs them eagerly (no GPU needed)."""

    made: list[EagerSpy] = []

    def __init__(self, model):
        super().__init__(model)
        self.passes = 0
        EagerSpy.made.append(self)

    def __call__(self, packs, caches, *inputs):
        self.passes += 1
        return self.model.forward_gen(packs, caches, *inputs)


def test_sampler_hands_small_passes_to_a_graph(monkeypatch):
    engine = cosmos3.load("tiny", device="cpu", guardrails=False)
    monkeypatch.setattr(sampler, "PassGraph", EagerSpy)
    EagerSpy.made = []
    small = dict(mode="text2image", prompt="a cup", seed=1, num_steps=3, progress=False)
    plain = engine.generate(**small).latents
    assert EagerSpy.made == []  # graph_max_rows is 0 on the CPU
    engine.transformer.graph_max_rows = 10**6
    assert torch.equal(engine.generate(**small).latents, plain)
    assert len(EagerSpy.made) == 1 and EagerSpy.made[0].passes == 3  # one graph per request, every pass through it
    engine.transformer.graph_max_rows = 1  # every pass is larger: eager
    engine.generate(**small)
    assert len(EagerSpy.made) == 1


class FakeGraph:
    """`torch.cuda.CUDAGraph` on the CPU: `replay` recomputes the captured call from the graph's own input buffers
    into its output tensors, which is what a replay does; a capture runs the call (a real one only records it)."""

    def __init__(self):
        self.recompute = None

    def replay(self) -> None:
        self.recompute()


class CpuPassGraph(PassGraph):
    """PassGraph over FakeGraph: the buffers, copies, clones and restarts of the real class, on any machine."""

    def _capture(self, packs, caches, leaves, spec) -> None:
        super()._capture(packs, caches, leaves, spec)

        def recompute() -> None:  # kernels only: a replay runs no Python, so no hook either
            hook, self.model.between_layers = self.model.between_layers, None
            try:
                out = self.model.forward_gen(packs, caches, *tree_unflatten(self.inputs, self.spec))
            finally:
                self.model.between_layers = hook
            for held, new in zip(self.outputs, tree_flatten(out)[0], strict=True):
                if isinstance(held, torch.Tensor):
                    held.copy_(new)

        self.graph.recompute = recompute


@pytest.fixture
def cpu_graphs(monkeypatch):
    """The sampler's graphs on the CPU (FakeGraph), every pass small enough."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(pass_graph, "record", lambda graph, fn: fn())
    monkeypatch.setattr(sampler, "PassGraph", CpuPassGraph)
    engine = cosmos3.load("tiny", device="cpu", guardrails=False)
    return engine


def test_replays_read_each_steps_inputs_and_hand_out_copies(cpu_graphs):
    """Guided, unguided with the step cache (its reused velocities must not be a replay's buffers), a batch, and
    the server's hook: the latents of graphed passes equal the eager ones."""
    engine = cpu_graphs
    model = engine.transformer
    requests = [
        dict(mode="text2image", prompt="a red cup", seed=3, num_steps=5),
        dict(mode="text2video", prompt="a robot arm", seed=4, num_steps=4, enable_sound=True, guidance=4.0),
        dict(mode="text2video", prompt="no guidance", seed=5, num_steps=12, guidance=1.0, step_cache=0.5),
    ]
    for request in requests:
        eager = engine.generate(progress=False, **request)
        model.graph_max_rows = 10**6
        calls: list[int] = []
        model.between_layers = functools.partial(calls.append, 1)
        try:
            graphed = engine.generate(progress=False, **request)
        finally:
            model.graph_max_rows, model.between_layers = 0, None
        assert torch.equal(graphed.latents, eager.latents), request
        computed = graphed.metadata["computed_steps"]
        layers, prompts = len(model.layers), 1 if request.get("guidance") == 1.0 else 2
        # The prompts' caches and the eager first pass after every layer, never in the capture, once per replay.
        assert len(calls) == prompts * layers + layers + computed - 1, request
    batch = [dict(mode="text2image", prompt=p, seed=s, num_steps=4) for p, s in (("a cup", 1), ("two red cups", 2))]
    alone = [engine.generate(progress=False, **r).latents for r in batch]
    model.graph_max_rows = 10**6
    for result, expected in zip(engine.generate_batch(batch), alone, strict=True):
        assert torch.equal(result.latents, expected)


def test_a_new_set_of_prompts_starts_over_and_a_new_shape_is_refused(cpu_graphs):
    from cosmos3.model.sequence import pack

    model = cpu_graphs.transformer
    cfg = model.config
    packs = [pack(cfg, ids, (2, 8, 8), [], fps=16.0, vae_temporal_compression=4) for ids in ([1, 2, 3], [4, 5])]
    x = torch.randn(cfg.latent_channel, 2, 8, 8)
    graph = CpuPassGraph(model)
    handed_out = []
    with torch.no_grad():
        caches = [model.und_cache(p) for p in packs]
        for packed, cache in zip(packs, caches, strict=True):  # the second prompt: eager again, then captured
            for step, t in enumerate((900, 600, 300)):
                x = x * 0.9 + 0.1
                t = torch.tensor(t)
                got = graph([packed], [cache], x, t, None, None)[0][0]
                expected = model.forward_gen([packed], [cache], x, t)[0][0]
                assert torch.equal(got, expected), step
                handed_out.append((got, expected))
        assert graph.replays == 4
        # Later replays leave what earlier calls returned alone: the caller's copies, not the graph's buffers.
        assert all(torch.equal(got, expected) for got, expected in handed_out)
        with pytest.raises(ValueError, match="another structure or shape"):
            graph([packs[1]], [caches[1]], x[:, :1], t, None, None)


needs_gpu = pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")


def _switches() -> list:
    cases = [pytest.param({}, id="sdpa")]
    flash_why = flash_available("cuda", torch.bfloat16, 16) if GPU else "no GPU"
    cases.append(pytest.param({"flash_attention": True}, id="flash", marks=pytest.mark.skipif(
        flash_why is not None, reason=str(flash_why))))  # fmt: skip
    fp8_ok = GPU and torch.cuda.get_device_capability() >= (9, 0)
    cases.append(pytest.param({"fp8": True, "fp8_attention": True}, id="fp8", marks=pytest.mark.skipif(
        not fp8_ok, reason="FP8 needs a Hopper GPU")))  # fmt: skip
    return cases


class Counting(PassGraph):
    made: list[Counting] = []

    def __init__(self, model):
        super().__init__(model)
        Counting.made.append(self)


def _twice(engine, monkeypatch, **request):
    """The request's latents replayed from graphs and eagerly; the graphs made."""
    monkeypatch.setattr(sampler, "PassGraph", Counting)
    Counting.made = []
    graphed = engine.generate(progress=False, **request)
    made, Counting.made = Counting.made, []
    rows, engine.transformer.graph_max_rows = engine.transformer.graph_max_rows, 0
    try:
        eager = engine.generate(progress=False, **request)
    finally:
        engine.transformer.graph_max_rows = rows
    assert Counting.made == []
    return graphed, eager, made


@needs_gpu
@pytest.mark.parametrize("switches", _switches())
def test_replayed_passes_equal_eager_ones(monkeypatch, switches):
    engine = cosmos3.load("tiny", device="cuda", guardrails=False, compile=False, **switches)
    assert engine.transformer.graph_max_rows == GRAPH_MAX_ROWS
    requests = [
        dict(mode="text2image", prompt="a red cup on a table", seed=3, num_steps=5),
        dict(mode="text2video", prompt="a robot arm", seed=4, num_steps=4, enable_sound=True, guidance=4.0),
        dict(mode="text2video", prompt="no guidance", seed=5, num_steps=3, guidance=1.0),
    ]
    for request in requests:
        graphed, eager, made = _twice(engine, monkeypatch, **request)
        assert len(made) == 1 and made[0].replays == request["num_steps"] - 1, request  # the first pass is eager
        assert torch.equal(graphed.latents, eager.latents), request
        assert (graphed.latents - eager.latents).abs().max() == 0
        if request.get("enable_sound"):  # the decoded waveform: the sound latents' own replays
            assert graphed.sound is not None and (graphed.sound == eager.sound).all()


@needs_gpu
def test_replayed_passes_equal_eager_ones_in_image_and_action_modes(monkeypatch):
    """Clean conditioning frames, action rows of an embodiment domain, and chained chunks (a graph per chunk)."""
    import numpy as np

    engine = cosmos3.load("tiny", device="cuda", guardrails=False, compile=False)
    image = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    common = dict(prompt="push the block", image=image, num_steps=3, seed=2)
    actions = dict(domain_name="pusht", action_chunk_size=4, action=[[0.3, -0.2]] * 4, guidance=1.0)
    requests = [
        (dict(mode="image2video", **common), 1),
        (dict(mode="policy", domain_name="droid_lerobot", action_chunk_size=4, chunks=2, **common), 2),
        (dict(mode="forward_dynamics", **actions, **common), 1),
    ]
    for request, chunks in requests:
        graphed, eager, made = _twice(engine, monkeypatch, **request)
        assert len(made) == chunks and all(g.replays == request["num_steps"] - 1 for g in made), request["mode"]
        assert torch.equal(graphed.latents, eager.latents), request["mode"]
        if graphed.action is not None:
            assert (graphed.action == eager.action).all(), request["mode"]


@needs_gpu
def test_replays_with_the_step_cache_in_a_batch_and_between_layers(monkeypatch):
    engine = cosmos3.load("tiny", device="cuda", guardrails=False, compile=False)
    model = engine.transformer
    cached = dict(mode="text2video", prompt="a cup", seed=6, num_steps=12, step_cache=0.5)
    graphed, eager, made = _twice(engine, monkeypatch, **cached)
    computed = graphed.metadata["computed_steps"]
    assert computed < 12 and made[0].replays == computed - 1
    assert torch.equal(graphed.latents, eager.latents)

    # A batch: one graph for both requests' passes (lists of latents), the same latents as separate requests.
    monkeypatch.setattr(sampler, "PassGraph", Counting)
    Counting.made = []
    batch = [dict(mode="text2image", prompt=p, seed=s, num_steps=4) for p, s in (("a cup", 1), ("two red cups", 2))]
    results = engine.generate_batch(batch)
    assert len(Counting.made) == 1 and Counting.made[0].replays == 3
    for request, result in zip(batch, results, strict=True):
        model.graph_max_rows = 0
        alone = engine.generate(progress=False, **request)
        model.graph_max_rows = GRAPH_MAX_ROWS
        assert torch.equal(result.latents, alone.latents)

    # The server's hook: after every layer of the eager pass, never inside a capture, once after each replay.
    calls = []
    model.between_layers = lambda: calls.append(1)
    try:
        engine.generate(progress=False, mode="text2image", prompt="a cup", seed=1, num_steps=4)
    finally:
        model.between_layers = None
    layers = len(model.layers)
    assert len(calls) == 2 * layers + layers + 3  # two prompts' caches (guided), the eager first pass, three replays


@needs_gpu
def test_replays_read_new_inputs_and_refuse_another_shape():
    from cosmos3.model.sequence import pack

    engine = cosmos3.load("tiny", device="cuda", guardrails=False, compile=False)
    model = engine.transformer
    cfg = model.config
    packed = pack(cfg, [1, 2, 3, 4], (2, 8, 8), [], fps=16.0, vae_temporal_compression=4, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(cfg.latent_channel, 2, 8, 8, device="cuda", dtype=model.dtype, generator=gen)
    graph = PassGraph(model)
    with torch.no_grad():
        cache = model.und_cache(packed)
        for step, t in enumerate((900, 600, 300)):  # eager, captured and replayed, replayed
            t = torch.tensor(t, device="cuda")
            x = x * 0.9 + 0.1
            got = graph([packed], [cache], x, t, None, None)[0][0]
            assert torch.equal(got, model.forward_gen([packed], [cache], x, t)[0][0]), step
        assert graph.replays == 2
        with pytest.raises(ValueError, match="another structure or shape"):
            graph([packed], [cache], x[:, :1], t, None, None)
