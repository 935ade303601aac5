"""`cosmos3.load`: find a checkpoint, load every component once, and serve requests from it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cosmos3.config import TransformerConfig
from cosmos3.errors import Cancelled, RequestError
from cosmos3.generation.codecs import SoundCodec, VideoCodec
from cosmos3.generation.parts import Parts
from cosmos3.generation.pass_graph import GRAPH_MAX_ROWS
from cosmos3.generation.pipeline import Generator, batch_key
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.result import GenerationResult
from cosmos3.generation.sampler import Schedule
from cosmos3.guardrails import CosmosGuardrail, Guardrail
from cosmos3.loading.checkpoint import CheckpointError, read_tensors, weight_files
from cosmos3.loading.components import (
    load_processor,
    load_transformer,
    load_vision_tower,
    reasoner_text_config,
    resolve_path,
)
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.parallel.launch import on_all_ranks
from cosmos3.parallel.layout import SINGLE, Groups, Layout
from cosmos3.parallel.offload import offload_layers
from cosmos3.reasoning.reasoner import Reasoner, Sampling

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SURFACES = ("generator", "reasoner")

# Smaller defaults for the tiny model so that every command finishes on a CPU in seconds.
TINY_DEFAULTS = {"resolution": "256", "num_frames": 17, "num_steps": 8}

SWITCH_CHOICES = (True, False, "auto")  # compile and flash_attention
# compile="auto" compiles a pass only from this many generation rows (both branches): a 480p video has 2 x 18,720.
# Measured on an H200 (benchmarks/profile_step.py): compiling takes ~9 s cold and ~2 s with a warm Inductor cache, and
# saves 0.37 s of a 1.91 s 480p guided step (13 s over 35 steps); a 256p step (2 x 2,880 rows, 0.2 s) or a 720p
# image (2 x 920) saves under 2 s a request, less than a cold compile.
AUTO_COMPILE_ROWS = 8192
# fast=True: the step cache's threshold for requests that set none. With every fast option on (256p x 189 frames, 35
# steps, H200, 2026-12-03) 0.1 computes 15 of 35 steps and lands 0.178 from the exact path's latents, 0.05 computes 17
# and lands 0.174: FP8 makes most of that distance, and two steps fewer take 9% off a 720p request
# (benchmarks/README.md, "Step caching").
FAST_STEP_CACHE = 0.1


def speed_up_generation(
    model: Cosmos3Transformer,
    device: torch.device,
    *,
    fp8: bool = False,
    fp8_attention: bool = False,
    flash_attention: bool | str = "auto",
    compile: bool | str = "auto",
    one_gpu: bool = True,
    cuda_graphs: bool = True,
    field: str = "fp8_attention",
) -> None:
    """The generation pathway's speed switches (`cosmos3.load`'s), applied to `model` in place; the benchmarks set up
    their variants with it too. `one_gpu`: whether `compile="auto"` compiles and small passes replay from CUDA graphs
    (one GPU, no parallel layout or offload). `cuda_graphs=False` keeps every pass eager (the benchmarks compare
    both; graphs change no result). `field` names the request field an impossible FP8 attention is reported under
    (`fast` sets it)."""
    if fp8:  # opt-in: changes results beyond bf16 noise
        from cosmos3.model.fp8 import use_fp8_generation_linears

        use_fp8_generation_linears(model)
    if fp8_attention:
        from cosmos3.model.fp8_attention import available, use_fp8_attention

        why = available() if device.type == "cuda" else "FP8 attention needs a CUDA device"
        if why is not None:
            raise RequestError(field, True, "false", f"is not possible here ({why})")
        use_fp8_attention(model)
    elif flash_attention:
        from cosmos3.model.flash_attention import MIN_QUERIES, available, use_flash_attention

        why = available(device, model.dtype, model.config.head_dim)
        if why is None:
            auto = flash_attention == "auto"
            use_flash_attention(model, device, MIN_QUERIES if auto else 0, required=not auto)
        elif flash_attention is True:
            raise RequestError("flash_attention", True, "false or 'auto'", f"is not possible here ({why})")
    if cuda_graphs and one_gpu and device.type == "cuda":
        model.graph_max_rows = GRAPH_MAX_ROWS
    if compile is True:
        model.compile_generation_layers()
    elif compile == "auto" and one_gpu:
        model.compile_generation_layers(min_rows=AUTO_COMPILE_ROWS)


class Engine:
    """A loaded checkpoint. One copy of the weights serves the Generator and the Reasoner."""

    def __init__(
        self,
        path: Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        surfaces: tuple[str, ...] | list[str] = SURFACES,
        fp8: bool = False,
        compile: bool | str = "auto",
        guardrails: bool | Guardrail | None = None,
        vae_tiling: bool = False,
        layerwise_offload: bool = False,
        groups: Groups = SINGLE,
        fast: bool = False,
        fp8_attention: bool = False,
        flash_attention: bool | str = "auto",
        cuda_graphs: bool = True,
    ):
        from transformers import AutoTokenizer

        self.groups = groups
        # In a parallel layout every call is mirrored on the other ranks in order: one at a time (a null lock when
        # there is one process, so that single-GPU callers keep their own concurrency).
        self._ranks_lock = threading.Lock() if groups.distributed else contextlib.nullcontext()
        if not groups.leader:  # rank 0 checks prompts and outputs for every rank
            guardrails = False
        if not isinstance(cuda_graphs, bool):
            raise RequestError("cuda_graphs", cuda_graphs, "true or false")
        for name, value in (("compile", compile), ("flash_attention", flash_attention)):
            if value not in SWITCH_CHOICES or not isinstance(value, bool | str):  # 1 == True, but 1 is no switch
                raise RequestError(name, value, "true, false or 'auto'")
        if fast:  # every speed option that changes results beyond bf16 noise, together (README: Speed)
            if groups.tp is not None or layerwise_offload:
                raise RequestError("fast", True, "false with tensor_parallel_size > 1 or layerwise_offload (FP8)")
            fp8, fp8_attention, compile = True, True, True
        # Not combined yet: FP8 and compile replace or trace the very modules that TP and offload rewire.
        if fp8 and (groups.tp is not None or layerwise_offload):
            raise RequestError("fp8", True, "false with tensor_parallel_size > 1 or layerwise_offload")
        if fp8_attention and groups.distributed:  # tensor- and sequence-parallel attention hooks into the exact one
            raise RequestError("fp8_attention", True, "false with more than one GPU")
        if fp8_attention and flash_attention is True:  # both replace the same attention
            raise RequestError("flash_attention", True, "false or 'auto' with fp8_attention or fast")
        if compile is True and layerwise_offload:
            raise RequestError("compile", True, "false with layerwise_offload")

        self.path = path
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.surfaces = tuple(surfaces)
        for surface in self.surfaces:
            if surface not in SURFACES:
                raise ValueError(f"surfaces entry {surface!r} is unknown; allowed: {', '.join(SURFACES)}")
        pipeline_layout = (path / "transformer" / "config.json").is_file()
        root_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if not pipeline_layout and "generator" in self.surfaces:
            raise CheckpointError(
                f"{path} holds only the Reasoner (transformers layout, no transformer/ folder); "
                "load it with surfaces=['reasoner']"
            )
        # Before the weights: a missing guardrail package should fail in a second, not after minutes of loading.
        guardrail = self._load_guardrail(path, guardrails) if "generator" in self.surfaces else None
        if pipeline_layout:
            cfg = TransformerConfig.from_json(path / "transformer" / "config.json")
            files = weight_files(path / "transformer")
        else:
            cfg, files = reasoner_text_config(root_config), weight_files(path)
        # With layerwise offload the weights are read into host memory: the GPU never holds every layer at once.
        load_device = torch.device("cpu") if layerwise_offload else self.device
        self.transformer, vision_weights = load_transformer(
            cfg, files, load_device, self.dtype, generator="generator" in self.surfaces, groups=groups
        )
        if layerwise_offload:
            offload_layers(self.transformer, self.device)
            vision_weights = {k: v.to(self.device) for k, v in vision_weights.items()}
        one_gpu = self.device.type == "cuda" and not groups.distributed and not layerwise_offload
        if "generator" in self.surfaces:
            speed_up_generation(
                self.transformer,
                self.device,
                fp8=fp8,
                fp8_attention=fp8_attention,
                flash_attention=flash_attention,
                compile=compile,
                one_gpu=one_gpu,
                cuda_graphs=cuda_graphs,
                field="fast" if fast else "fp8_attention",
            )
        if (compile is True and not groups.distributed) or (compile == "auto" and one_gpu):
            # The Reasoner's decode step: it runs thousands of times in a server's life, so it always pays back its
            # compile (three small compiles: one row, the first batch size, then any). Not under TP, whose steps
            # are not CUDA graphs.
            self.transformer.compile_decode_layers()
        if (path / "vision_encoder").is_dir():
            vision_weights.update(read_tensors(weight_files(path / "vision_encoder"), self.device, self.dtype))
        self.vision_weights = vision_weights
        tokenizer_dir = path / "text_tokenizer" if (path / "text_tokenizer").is_dir() else path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

        self.generator: Generator | None = None
        if "generator" in self.surfaces:
            self.generator = Generator(self._load_generation_parts(path, tokenizer), guardrail)
            if vae_tiling:  # opt-in: decodes in overlapping tiles, for memory (see benchmarks/README.md)
                self.generator.parts.video.vae.enable_tiling()
        self.reasoner: Reasoner | None = None
        if "reasoner" in self.surfaces:
            self.reasoner = self._load_reasoner(path, tokenizer, root_config)
        self.defaults = dict(TINY_DEFAULTS) if path.name.startswith("tiny-v") else {}
        if fast:
            self.defaults["step_cache"] = FAST_STEP_CACHE

    def _load_generation_parts(self, path: Path, tokenizer) -> Parts:
        from diffusers import AutoencoderKLWan

        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        vae = AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=self.dtype).to(self.device).eval()
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        sound = None
        if (path / "sound_tokenizer").is_dir():
            from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

            with warnings.catch_warnings():  # the codec uses torch's legacy weight_norm, which warns on every load
                warnings.simplefilter("ignore", FutureWarning)
                codec = Cosmos3AVAEAudioTokenizer.from_pretrained(path / "sound_tokenizer", torch_dtype=self.dtype)
            sound = SoundCodec(codec.to(self.device).eval())
        return Parts(
            transformer=self.transformer,
            video=VideoCodec(vae, self.transformer.config.latent_channel),
            sound=sound,
            tokenizer=tokenizer,
            schedule=Schedule(scheduler_config, native=index.get("use_native_flow_schedule", False)),
            default_use_system_prompt=index.get("default_use_system_prompt", True),
            groups=self.groups,
        )

    def _load_guardrail(self, path: Path, guardrails: bool | Guardrail | None) -> Guardrail | None:
        """None follows the checkpoint (model_index.json `enable_safety_checker`, on when absent, as diffusers)."""
        if isinstance(guardrails, Guardrail):
            return guardrails
        if guardrails is None:
            index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
            guardrails = bool(index.get("enable_safety_checker", True))
        return CosmosGuardrail(str(self.device)) if guardrails else None

    def _load_reasoner(self, path: Path, tokenizer, root_config: dict) -> Reasoner:
        vision = processor = None
        vision_config = root_config.get("vision_config")
        if vision_config and self.vision_weights:
            vision = load_vision_tower(vision_config, self.vision_weights, self.device, self.dtype)
            processor = load_processor(path, tokenizer, vision_config)
        elif self.vision_weights:
            logger.warning("vision tower weights found but no vision_config in config.json: the Reasoner is text-only")
        eos = []
        if (path / "generation_config.json").is_file():
            value = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
            eos = value if isinstance(value, list) else [value] if value is not None else []
        return Reasoner(self.transformer, tokenizer, processor, vision, root_config, eos)

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.config

    # ------------------------------------------------------------------------------------------ Generator
    def request(self, request: GenerateRequest | dict | None = None, **fields: Any) -> GenerateRequest:
        """Build and resolve a request from a `GenerateRequest`, a dict in a dialect's wire names (`"dialect"` names
        it; the Python API's by default), or keyword fields. The one place requests are resolved."""
        if request is None:
            request = GenerateRequest.from_dict(fields)
        elif isinstance(request, dict):
            request = GenerateRequest.from_dict({**request, **fields})
        elif fields:
            raise TypeError("pass either a GenerateRequest or keyword fields, not both")
        video = self.generator.parts.video if self.generator is not None else None
        return request.resolved(self.defaults, (video.spatial, video.temporal) if video is not None else None)

    def _generator(self, mode: Any) -> Generator:
        if self.generator is None:
            raise RequestError(
                "mode", mode, "reasoning only", f"needs the Generator, which this engine did not load ({self.surfaces})"
            )
        return self.generator

    @torch.inference_mode()
    def generate(
        self,
        request: GenerateRequest | dict | None = None,
        *,
        progress: bool = True,
        on_step: Callable[[int, int], None] | None = None,
        **fields: Any,
    ) -> GenerationResult:
        """`engine.generate(mode="text2video", prompt="...", ...)`; see `GenerateRequest` for every field.
        `on_step(step, steps)` is called after every denoising step; raising `cosmos3.errors.Cancelled` stops."""
        generator = self._generator(fields.get("mode", "generate"))
        req = self.request(request, **fields)
        refusal = generator.admit([req])[0]
        if refusal is not None:
            raise refusal
        outcome = self._run([req], [on_step], progress)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @torch.inference_mode()
    def generate_batch(
        self, requests: list[GenerateRequest | dict], on_steps: list | None = None
    ) -> list[GenerationResult | RequestError | Cancelled]:
        """Several text2image / text2video requests of one shape, schedule and sound setting, denoised in shared
        passes (each keeps its own prompt, seed and guidance; the outputs equal separate runs). Each request gets
        its own outcome: its result, the RequestError that refused it, or Cancelled."""
        generator = self._generator("generate")
        reqs = [self.request(r) for r in requests]
        on_steps = on_steps or [None] * len(reqs)
        outcomes: list = generator.admit(reqs)
        admitted = [i for i, refusal in enumerate(outcomes) if refusal is None]
        ran = self._run([reqs[i] for i in admitted], [on_steps[i] for i in admitted])
        for i, outcome in zip(admitted, ran, strict=True):
            outcomes[i] = outcome
        return outcomes

    @torch.inference_mode()
    def _run(self, reqs: list[GenerateRequest], on_steps: list | None = None, progress: bool = False) -> list:
        """Admitted requests through the Generator, on every rank of a parallel layout (rank 0 shares them)."""
        if not reqs:
            return []
        with self._ranks_lock:
            on_all_ranks(self.groups, "_run", reqs)
            start = time.perf_counter()
            outcomes = self.generator.run(reqs, on_steps or [None] * len(reqs), progress and self.groups.leader)
        seconds = time.perf_counter() - start  # a batch's requests share its passes, so they share its time
        for req, outcome in zip(reqs, outcomes, strict=True):
            if isinstance(outcome, GenerationResult):  # what made it, for its sidecar and MP4 tags
                outcome.record_origin(req, self.path, seconds)
        return outcomes

    def close(self) -> None:
        """Release the other ranks of a parallel layout (also done at exit); the engine is unusable after."""
        if self.groups.distributed and self.groups.leader:
            from cosmos3.parallel.launch import stop

            stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch_key(self, request: GenerateRequest) -> tuple | None:
        """Resolved requests with equal keys can run in one `generate_batch`; None: this one runs alone."""
        return batch_key(request) if self.generator is not None else None

    # ------------------------------------------------------------------------------------------ Reasoner
    def _reasoner(self) -> Reasoner:
        if self.reasoner is None:
            raise RequestError("surfaces", list(self.surfaces), "an engine loaded with the reasoner surface")
        return self.reasoner

    @staticmethod
    def _split(kwargs: dict) -> tuple[Sampling, dict]:
        encode_keys = ("reasoning", "video_fps", "video_num_frames")
        encode = {k: kwargs.pop(k) for k in encode_keys if k in kwargs}
        known = [f.name for f in dataclasses.fields(Sampling)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise RequestError(unknown[0], kwargs[unknown[0]], f"a keyword of {', '.join(known + list(encode_keys))}")
        return Sampling(**kwargs), encode

    def reason(self, messages: list[dict] | str, **kwargs: Any) -> str:
        """Reply to one conversation (OpenAI / Qwen3-VL messages, or a plain prompt string).

        kwargs: max_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, presence_penalty, seed,
        stop, reasoning (append the explicit-reasoning instruction), video_fps / video_num_frames."""
        params, encode = self._split(kwargs)
        return self._complete([_as_messages(messages)], params, encode)[0].text

    def reason_choices(self, messages: list[dict] | str, **kwargs: Any) -> list[str]:
        """All `n` choices of a reply to one conversation (choice i sampled with seed + i)."""
        params, encode = self._split(kwargs)
        return [r.text for r in self._complete([_as_messages(messages)], params, encode)]

    def reason_batch(self, conversations: list[list[dict] | str], **kwargs: Any) -> list[str]:
        """Several conversations decoded together in one batch."""
        params, encode = self._split(kwargs)
        return [r.text for r in self._complete([_as_messages(m) for m in conversations], params, encode)]

    def reason_stream(self, messages: list[dict] | str, **kwargs: Any) -> Iterator[str]:
        """Like `reason`, yielding the reply in pieces as it is decoded."""
        params, encode = self._split(kwargs)
        return self._stream(_as_messages(messages), params, encode)

    @torch.inference_mode()
    def _complete(self, conversations: list[list[dict]], params: Sampling, encode: dict) -> list:
        with self._ranks_lock:
            on_all_ranks(self.groups, "_complete", conversations, params, encode)
            return self._reasoner().complete(conversations, params, **encode)

    def _stream(self, messages: list[dict], params: Sampling, encode: dict) -> Iterator[str]:
        reasoner = self._reasoner()
        with self._ranks_lock:
            on_all_ranks(self.groups, "_drain", messages, params, encode)
            pieces = reasoner.stream(messages, params, **encode)
            try:
                yield from pieces
            finally:  # a caller that stops early must not leave the other ranks in the middle of a decode
                if self.groups.distributed:
                    for _ in pieces:
                        pass

    def _drain(self, messages: list[dict], params: Sampling, encode: dict) -> None:
        """A follower's part of `reason_stream`: the same decode, its text unused."""
        for _ in self._reasoner().stream(messages, params, **encode):
            pass


def _as_messages(messages: list[dict] | str) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def load(
    model: str | Path = "tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    surfaces: tuple[str, ...] | list[str] | None = None,
    fp8: bool = False,
    compile: bool | str = "auto",
    guardrails: bool | Guardrail | None = None,
    vae_tiling: bool = False,
    fast: bool = False,
    fp8_attention: bool = False,
    flash_attention: bool | str = "auto",
    cuda_graphs: bool = True,
    tensor_parallel_size: int = 1,
    cfg_parallel_size: int = 1,
    ulysses_degree: int = 1,
    layerwise_offload: bool = False,
    revision: str | None = None,
) -> Engine:
    """Load `"tiny"`, a local checkpoint folder, or a hub id (e.g. `"nvidia/Cosmos3-Nano"`).

    A hub id is downloaded with `huggingface_hub.snapshot_download` into the hub cache (HF_HOME / HF_HUB_CACHE),
    only the files the requested `surfaces` need, at `revision` (a branch, tag or commit hash; default main);
    HF_TOKEN is sent for gated or private repos, and with HF_HUB_OFFLINE=1 only the cache is read. Errors (gated,
    offline and not cached, unknown revision) say what to do.

    `device`/`dtype`: CUDA and bfloat16 when a GPU is present, else the CPU and float32.
    `surfaces=["reasoner"]` skips the generation pathway, VAE and audio codec (about half the memory).
    `compile="auto"` (the default) torch.compiles the generation layer on a single GPU for passes of at least
    `AUTO_COMPILE_ROWS` generation rows (480p video and up, where it pays back its compile time) and the
    Reasoner's decode step; True compiles every pass, False none. `flash_attention="auto"` (the default) runs the
    generation rows' attention with FlashAttention-4 (the `flash-attn-4` package; Hopper or Blackwell, bf16) where
    it is installed, from 2,048 queries a branch (256p video and up: 14% faster than cuDNN at 720p, the same exact
    arithmetic class), and cuDNN's SDPA elsewhere; True everywhere it can (an error where it cannot), False never.
    `cuda_graphs=True` (the default) replays denoising passes of up to `GRAPH_MAX_ROWS` generation rows (a 720p
    image, 256p video) from a CUDA graph on one GPU: the same kernels and latents, one launch a step; False keeps
    every pass eager.
    Opt-in speed options (see benchmarks/README.md for their effect on speed and output):
    `fp8=True` runs the generation pathway's matmuls in FP8 (Hopper), `fp8_attention=True` its attention (cuDNN's
    FP8 flash attention, Hopper), `fast=True` is both + compile + the step cache (`step_cache=0.1` for requests
    that set none), `vae_tiling=True` decodes the video in tiles to bound memory.
    Beyond one GPU (seed 001; the world size is the product of the three degrees): `tensor_parallel_size` splits
    every layer's heads and MLP over GPUs, `cfg_parallel_size=2` runs the two guidance branches on two GPUs,
    `ulysses_degree` splits the generated tokens over GPUs. This process becomes rank 0 and starts the other
    ranks itself (or joins them under `torchrun`). `layerwise_offload=True` keeps the transformer layers in
    pinned CPU memory and streams them to the GPU a layer ahead of use.
    `guardrails`: None follows the checkpoint (on for released ones: the `cosmos_guardrail` package must be
    installed, or loading fails saying how to get it), False turns them off, or pass your own checker object
    with `check_text(prompt) -> bool` and `check_video(frames) -> frames | None`."""
    cuda = torch.cuda.is_available()
    device = torch.device(device or ("cuda" if cuda else "cpu"))
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    layout = Layout(tensor_parallel_size, cfg_parallel_size, ulysses_degree)
    path = resolve_path(model, revision=revision, surfaces=surfaces)
    if surfaces is None:  # everything the folder holds
        surfaces = SURFACES if (path / "transformer" / "config.json").is_file() else ("reasoner",)
    options = dict(
        path=path,
        dtype=dtype,
        surfaces=tuple(surfaces),
        fp8=fp8,
        compile=compile,
        vae_tiling=vae_tiling,
        layerwise_offload=layerwise_offload,
        fast=fast,
        fp8_attention=fp8_attention,
        flash_attention=flash_attention,
        cuda_graphs=cuda_graphs,
    )
    groups = SINGLE
    if layout.world_size > 1:
        from cosmos3.parallel.launch import ready, start, stop

        groups, device = start(layout, device, Engine, {**options, "guardrails": False})
        try:
            engine = Engine(device=device, guardrails=guardrails, groups=groups, **options)
        except Exception as exc:  # tell the other ranks, then report rank 0's own error
            with contextlib.suppress(RuntimeError):
                ready(f"{type(exc).__name__}: {exc}")
            stop()
            raise
        try:
            ready(None)
        except RuntimeError:
            stop()
            raise
        return engine
    return Engine(device=device, guardrails=guardrails, groups=groups, **options)
