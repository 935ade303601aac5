"""The compiled generation layer: the regions around attention are traced once per number of generation rows (a new
prompt length compiles nothing), passes under `min_rows` stay uncompiled, and the results equal the plain path.

Dynamo traces with a counting backend that runs the traced graph as it is (no Inductor: no C++ compiler needed), so
these tests check what is compiled and when, not Inductor's kernels (benchmarks/profile_step.py measures those)."""

from __future__ import annotations

import pytest
import torch

import cosmos3
from cosmos3.config import preset
from cosmos3.errors import RequestError
from cosmos3.model.sequence import pack
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.reasoning.decoding import Sampling
from cosmos3.reference import randomize


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them uncompiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def _model() -> Cosmos3Transformer:
    model = Cosmos3Transformer(preset("tiny")).eval()
    randomize(model, seed=0)
    return model


def _packs(cfg, prompt_lengths: tuple[int, ...], shape=(3, 4, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
    packs = [pack(cfg, ids(n), shape, [], fps=24.0, vae_temporal_compression=4) for n in prompt_lengths]
    return packs, torch.randn(cfg.latent_channel, *shape, generator=gen)


def _step(model, packs, vision):
    with torch.no_grad():
        caches = [model.und_cache(p) for p in packs]
        return model.forward_gen(packs, caches, vision, 500.0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_regions_equal_plain_and_ignore_prompt_length():
    plain, compiled = _model(), _model()
    backend = CountingBackend()
    compiled.compile_generation_layers(backend=backend)
    packs, vision = _packs(plain.config, (13, 6))
    for got, expected in zip(_step(compiled, packs, vision), _step(plain, packs, vision), strict=True):
        torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=0)
    first = backend.graphs
    assert first >= 2  # both regions were traced
    # Other prompt lengths (the attention's key length) reuse the traced regions: nothing new is compiled.
    packs, vision = _packs(plain.config, (21, 3), seed=1)
    for got, expected in zip(_step(compiled, packs, vision), _step(plain, packs, vision), strict=True):
        torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=0)
    assert backend.graphs == first
    # Another number of generation rows (a new size) is a new specialisation.
    packs, vision = _packs(plain.config, (13, 6), shape=(2, 4, 6))
    _step(compiled, packs, vision)
    assert backend.graphs > first


def test_passes_below_min_rows_stay_uncompiled():
    model = _model()
    backend = CountingBackend()
    packs, vision = _packs(model.config, (9, 5))
    rows = sum(p.seq_len - p.und_len for p in packs)
    model.compile_generation_layers(min_rows=rows + 1, backend=backend)
    _step(model, packs, vision)
    assert backend.graphs == 0
    model.compile_generation_layers(min_rows=rows, backend=backend)
    _step(model, packs, vision)
    assert backend.graphs >= 2


def test_engine_compile_and_fast_options_are_checked():
    with pytest.raises(RequestError, match="compile"):
        cosmos3.load("tiny", compile="sometimes")
    with pytest.raises(RequestError, match="fast"):
        cosmos3.load("tiny", fast=True, layerwise_offload=True)
    # "auto" compiles only on a GPU: on the CPU the engine runs the plain layer.
    engine = cosmos3.load("tiny", device="cpu")
    assert engine.transformer.compiled_gen_in is None and engine.transformer.compiled_und_in is None
    # compile=True compiles the generation layer and the Reasoner's decode step (torch.compile is lazy: nothing is
    # traced at load); without the generation pathway, only the decode step.
    engine = cosmos3.load("tiny", device="cpu", compile=True)
    assert engine.transformer.compiled_gen_in is not None and engine.transformer.compiled_und_in is not None
    engine = cosmos3.load("tiny", device="cpu", compile=True, surfaces=["reasoner"])
    assert engine.transformer.compiled_gen_in is None and engine.transformer.compiled_und_in is not None
    if not torch.cuda.is_available():  # fast means FP8, which needs a GPU: an error, never silently dropped
        with pytest.raises(RuntimeError, match="FP8"):
            cosmos3.load("tiny", fast=True)


def _decode_tokens(model, steps: int = 6, rows: int = 2) -> list[list[int]]:
    """Greedy tokens of `rows` random prompts decoded together by the scheduler (no thread, eager steps)."""
    import queue

    from cosmos3.reasoning.decoding import Prompt, Row, Sampling
    from cosmos3.reasoning.scheduler import END, Scheduler

    gen = torch.Generator().manual_seed(3)
    scheduler = Scheduler(model, [], slots=4, threaded=False)
    outs, jobs = [], []
    for i in range(rows):
        ids = torch.randint(0, model.config.vocab_size, (5 + 3 * i,), generator=gen)
        with torch.no_grad():
            prompt = Prompt(ids, torch.arange(len(ids)).expand(3, -1), model.embed_tokens(ids))
        out: queue.Queue = queue.Queue()
        params = Sampling(max_tokens=steps, temperature=0, presence_penalty=0).check()
        jobs.append(scheduler.submit(prompt, params, Row(0), out, i))
        outs.append(out)
    tokens = []
    for job, out in zip(jobs, outs, strict=True):
        got = []
        while (item := scheduler.next(out))[1] is not END:
            got.append(item[1].id)
        assert job.error is None and len(got) == steps
        tokens.append(got)
    return tokens


def test_compiled_decode_step_equals_plain_and_compiles_three_times_at_most():
    plain, compiled = _model(), _model()
    backend = CountingBackend()
    compiled.compile_decode_layers(backend=backend)
    expected = _decode_tokens(plain)
    assert _decode_tokens(compiled) == expected
    assert backend.graphs == 2  # und_in and und_out, once each: every layer and every step reuse them
    # A second number of rows makes the rows dimension dynamic (one more graph each); one row is always a
    # specialisation of its own (dynamo's 0/1 rule); after that no size and no cache length compiles anything.
    assert _decode_tokens(compiled, steps=12, rows=3) == _decode_tokens(plain, steps=12, rows=3)
    assert backend.graphs == 4
    assert _decode_tokens(compiled, steps=20, rows=1) == _decode_tokens(plain, steps=20, rows=1)
    assert backend.graphs == 6
    assert _decode_tokens(compiled, steps=30, rows=4) == _decode_tokens(plain, steps=30, rows=4)
    assert backend.graphs == 6
    # The prompt cache and prefill stay plain: compiling the decode step leaves the generation regions alone.
    assert compiled.compiled_gen_in is None


def test_warm_up_compiles_the_decode_step_for_one_row_and_for_many():
    engine = cosmos3.load("tiny", device="cpu", surfaces=["reasoner"])
    backend = CountingBackend()
    engine.transformer.compile_decode_layers(backend=backend)
    engine.reasoner.warm_up()
    assert backend.graphs == 4  # und_in and und_out, at one row and with the rows dynamic
    # A first request of any batch size then compiles nothing more (end of turn ignored: every row decodes 4 tokens).
    engine.reasoner.eos_token_ids = []
    replies = engine.reasoner.complete([[{"role": "user", "content": "hi"}]] * 3, Sampling(max_tokens=4, seed=0))
    assert [r.completion_tokens for r in replies] == [4, 4, 4]
    assert backend.graphs == 4
