"""The Reasoner at Nano size: cosmos3 vs transformers' `generate`, same process, same (shared) random bf16 weights.

The prompt is ~50 text tokens plus an 8-frame 448x448 video (784 video tokens). The script prints:

- correctness: cosmos3's greedy tokens at batch 1 against transformers' (the matching prefix: random bf16 weights
  may part late), the scheduler's CUDA graphs against its eager steps on a batch whose rows come and go (identical),
  and the chunked prefill's logits against one pass;
- time to first token, cosmos3 (`Reasoner.complete`, the continuous-batching scheduler) vs transformers, both with
  the Qwen3-VL processor and the vision tower, and its parts;
- the Scheduler itself at concurrency 1, 16 and 64: requests submitted together, each read by the processor in
  its own thread and embedded holding the GPU lock (the vision tower), then decoded in one running batch: time to
  first token per request, inter-token latency, aggregate output tokens/s (whole run, and while every request
  decodes), and the GPU time of one decode step per batch size; beside transformers' `generate` tokens/s at
  batch 1 and 16.

    python benchmarks/reasoner.py                                                 # H100 / H200: about 2 minutes
    python benchmarks/reasoner.py --preset tiny --new-tokens 8 --concurrency 1,4  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time

import numpy as np
import torch
from common import default_device, gpu_name, print_table

from cosmos3.config import preset
from cosmos3.loading.checkpoint import GENERATOR_ONLY
from cosmos3.loading.tiny import build_tokenizer, tiny_vision_config, vision_token_ids
from cosmos3.model.transformer import Cosmos3Transformer, KVCache
from cosmos3.reasoning.decoding import Prompt, Row, prefill, prompt_logits, token_stream
from cosmos3.reasoning.reasoner import Reasoner, Sampling
from cosmos3.reasoning.scheduler import END, MAX_SLOTS, PREFILL_CHUNK, Scheduler
from cosmos3.reference import randomize


def build(device: torch.device, name: str = "nano"):
    from transformers import (
        Cosmos3OmniConfig,
        Cosmos3OmniForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    cfg = preset(name)
    tokenizer = build_tokenizer()
    ids = vision_token_ids(tokenizer)
    config = Cosmos3OmniConfig(
        text_config=dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": cfg.rope_theta,
                "mrope_section": cfg.rope_axes_dim,
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(out_hidden_size=cfg.hidden_size, deepstack_visual_indexes=[8, 16, 24])
        if name == "nano"
        else {k: v for k, v in tiny_vision_config(cfg.hidden_size).items() if k != "model_type"},
        **ids,
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        ref = Cosmos3OmniForConditionalGeneration(config)
    ref = ref.to(torch.bfloat16).to_empty(device=device)  # bf16 before allocating: fp32 Nano would not fit
    randomize(ref, seed=0)
    # Buffers computed at init (rotary tables) were left uninitialised by to_empty: rebuild them.
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, Qwen3VLVisionRotaryEmbedding

    ref.model.language_model.rotary_emb = Qwen3VLTextRotaryEmbedding(config.text_config).to(device)
    ref.model.visual.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config.vision_config).to(device)
    ref.eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = tokenizer.pad_token_id

    renames = {
        ".q_proj.": ".to_q.",
        ".k_proj.": ".to_k.",
        ".v_proj.": ".to_v.",
        ".o_proj.": ".to_out.",
        ".q_norm.": ".norm_q.",
        ".k_norm.": ".norm_k.",
    }
    weights = {}
    for name, p in ref.model.language_model.named_parameters():
        for a, b in renames.items():
            name = name.replace(a, b)
        weights[name] = p
    weights["lm_head.weight"] = ref.lm_head.weight
    with torch.device("meta"):
        ours = Cosmos3Transformer(cfg)
    missing = ours.load_state_dict(weights, assign=True, strict=False).missing_keys
    assert all(GENERATOR_ONLY.search(k) for k in missing), [k for k in missing if not GENERATOR_ONLY.search(k)]
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Qwen3VLVideoProcessor(
            patch_size=16,
            merge_size=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            size={"shortest_edge": 4096, "longest_edge": 8 * 448 * 448},
        ),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    reasoner = Reasoner(ours, tokenizer, processor, ref.model.visual, config.to_dict())
    reasoner.eos_token_ids = []  # decode the full budget on both sides
    return ref, reasoner, processor


def greedy(tokens: int) -> Sampling:
    return Sampling(max_tokens=tokens, temperature=0, presence_penalty=0).check()


def matching(a: list[int], b: list[int]) -> int:
    """The length of the common prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def scheduled(reasoner: Reasoner, prompts: list[Prompt], budgets: list[int], graph: bool) -> list[list[int]]:
    """Greedy tokens of `prompts` decoded together by a scheduler stepped here (no thread: the same steps every
    run), the last half joining a few steps late, so that rows come and go and the batch size changes."""
    scheduler = Scheduler(reasoner.transformer, [], slots=len(prompts), threaded=False, graph=graph)
    out: queue.Queue = queue.Queue()
    half = len(prompts) // 2
    for i in range(half):
        scheduler.submit(prompts[i], greedy(budgets[i]), Row(0), out, i)
    for _ in range(3):
        scheduler.step()
    for i in range(half, len(prompts)):
        scheduler.submit(prompts[i], greedy(budgets[i]), Row(0), out, i)
    while not scheduler.idle:
        scheduler.step()
    tokens: list[list[int]] = [[] for _ in prompts]
    while not out.empty():
        index, item = out.get()
        if item is not END:
            tokens[index].append(item.id)
    return tokens


def correctness(ref, reasoner: Reasoner, ref_inputs, messages: list[dict], tokens: int) -> dict:
    model = reasoner.transformer
    inputs = ref_inputs(1)
    prompt = reasoner.encode(messages, video_num_frames=8)
    same_ids = prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    expected = ref.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    expected = expected[0, inputs["input_ids"].shape[1] :].tolist()
    ours = reasoner.complete([messages], greedy(tokens), video_num_frames=8)[0]
    static = [t[0].id for t in token_stream(model, [prompt], greedy(tokens), []) if t[0] is not None]
    alone = scheduled(reasoner, [prompt], [tokens], graph=True)[0]
    # A batch whose rows come and go (the video prompt and text prompts of other lengths, other budgets).
    texts = ["hi", "Describe a kitchen.", "What will the robot do next, and why? Answer in detail."]
    prompts = [prompt] + [reasoner.encode([{"role": "user", "content": t}]) for t in texts]
    prompts, budgets = prompts * 2, [tokens, tokens // 2, tokens, tokens // 4] * 2
    graphed, eager = scheduled(reasoner, prompts, budgets, True), scheduled(reasoner, prompts, budgets, False)
    # Chunked prefill (the scheduler's chunk) against one pass, every position.
    length = len(prompt.input_ids)
    cache = KVCache(model.config, 1, length, prompt.embeds.device, model.dtype)
    pieces = []
    while cache.length < length:
        pieces.append(prefill(model, prompt, cache, min(cache.length + PREFILL_CHUNK, length)))
    chunked = model.lm_head(torch.cat(pieces, dim=1)[0]).float()
    whole = prompt_logits(model, prompt)
    return {
        "prompt_ids_equal_transformers": same_ids,
        "greedy_tokens": tokens,
        "scheduler_matches_transformers_for": matching(alone, expected),
        "static_path_matches_transformers_for": matching(static, expected),
        "scheduler_matches_static_path_for": matching(alone, static),
        "complete_text_equals_scheduler_tokens": ours.text == reasoner.tokenizer.decode(alone),
        "graph_steps_equal_eager_steps": graphed == eager,
        "graph_vs_eager_rows_matching": [matching(a, b) for a, b in zip(graphed, eager, strict=True)],
        "batched_row_matches_alone_for": matching(graphed[0], alone),
        "chunked_prefill_max_abs_logit_diff": round(float((chunked - whole).abs().max()), 4),
        "chunked_prefill_argmax_agree": round(float((chunked.argmax(-1) == whole.argmax(-1)).float().mean()), 4),
    }


class FairLock:
    """A lock taken in arrival order: with `threading.Lock` the scheduler thread, releasing it after a step, takes
    it straight back and starves the requests waiting to encode their prompts."""

    def __init__(self):
        self.cond = threading.Condition()
        self.tickets = self.serving = 0

    def __enter__(self) -> None:
        with self.cond:
            ticket, self.tickets = self.tickets, self.tickets + 1
            while ticket != self.serving:
                self.cond.wait()

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.serving += 1
            self.cond.notify_all()


def concurrent(
    reasoner: Reasoner, scheduler: Scheduler, lock: FairLock, messages: list[dict], requests: int, tokens: int
) -> dict:
    """`requests` requests at once: each reads its prompt on the host (the processor) in its own thread, submits it
    and reads its tokens from the scheduler's queue; the scheduler embeds the queued prompts together (the vision
    tower) within its steps, as the server's does."""
    params = greedy(tokens)
    start = time.perf_counter()
    records: list[dict] = [{} for _ in range(requests)]

    def one(i: int) -> None:
        begun = time.perf_counter()
        tokenized = reasoner.tokenize(messages, video_num_frames=8)  # the processor, on the host: no lock
        records[i]["read"] = time.perf_counter() - begun
        out: queue.Queue = queue.Queue()
        job = scheduler.submit(tokenized, params, Row(0), out, i)
        times = []
        while out.get()[1] is not END:
            times.append(time.perf_counter())
        records[i]["times"], records[i]["error"] = times, job.error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in records if r["error"] is not None]
    if errors:
        raise errors[0]
    times = [r["times"] for r in records]
    end = max(t[-1] for t in times)
    ttft = [(t[0] - start) * 1000 for t in times]
    itl = [(t[-1] - t[0]) / (len(t) - 1) * 1000 for t in times if len(t) > 1]
    total = sum(len(t) for t in times)
    # While every request decodes: from the last first token to the first last token.
    all_in, first_out = max(t[0] for t in times), min(t[-1] for t in times)
    steady = sum(sum(all_in <= x <= first_out for x in t) for t in times)
    return {
        "requests": requests,
        "tokens_each": tokens,
        "ttft_ms_median": round(statistics.median(ttft), 1),
        "ttft_ms_max": round(max(ttft), 1),
        "read_ms_median": round(statistics.median(r["read"] for r in records) * 1000, 1),
        "itl_ms_median": round(statistics.median(itl), 2) if itl else None,
        "aggregate_tok_s": round(total / (end - start), 1),
        "all_decoding_tok_s": round(steady / (first_out - all_in), 1) if first_out > all_in else None,
        "most_decoded_together": scheduler.most_active,
    }


class Phases:
    """Wall time of a scheduler's step phases (embedding, prefill, the rest: sampling and the decode step), each
    ended by a device synchronisation so that its GPU work counts where it was launched (`--phases` only: the
    synchronisations cost some of the overlap they measure)."""

    def __init__(self, scheduler: Scheduler, sync):
        self.seconds = {"embed": 0.0, "prefill": 0.0, "step": 0.0}
        for name, phase in (("embed", "embed_queued"), ("prefill", "admit"), ("step", "step")):
            setattr(scheduler, phase, self.timed(name, getattr(scheduler, phase), sync))

    def timed(self, name: str, fn, sync):
        def run(*a, **k):
            sync()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                self.seconds[name] += time.perf_counter() - start

        return run

    def report(self) -> dict:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["step"] = round(self.seconds["step"] - self.seconds["embed"] - self.seconds["prefill"], 3)
        return out


def warm(scheduler: Scheduler, prompt: Prompt, sizes: list[int]) -> None:
    """Run each batch size once (a few tokens), so that its CUDA graph is captured before the timed runs."""
    for size in sizes:
        out: queue.Queue = queue.Queue()
        jobs = [scheduler.submit(prompt, greedy(3), Row(0), out, i) for i in range(size)]
        for _ in jobs:
            while out.get()[1] is not END:
                pass


def step_gpu_ms(scheduler: Scheduler, sizes: list[int], repeat: int = 20) -> dict:
    """GPU time of one decode step per batch size, replaying the captured graphs (the scheduler is spent after:
    replays advance its buffers behind its back)."""
    out = {}
    for size in sizes:
        graph = scheduler.graphs.get(size)
        if graph is None:
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeat):
            graph.replay()
        end.record()
        end.synchronize()
        out[size] = round(begin.elapsed_time(end) / repeat, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64, help="per request, transformers and batch runs")
    parser.add_argument("--serve-tokens", type=int, default=128, help="per request in the concurrency runs")
    parser.add_argument("--parity-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--prefill-chunks", default=str(PREFILL_CHUNK), help="the scheduler's prefill chunks to try")
    parser.add_argument("--phases", action="store_true", help="report the wall time of the scheduler's phases")
    parser.add_argument("--preset", default="nano")
    parser.add_argument(
        "--compile",
        choices=("on", "off"),
        default="on",
        help="compile the decode step's regions as the engine does by default on a GPU (compile='auto')",
    )
    args = parser.parse_args()
    from transformers.video_utils import VideoMetadata

    levels = [int(c) for c in args.concurrency.split(",")]
    device = default_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ref, reasoner, processor = build(device, args.preset)
    if args.compile == "on" and device.type == "cuda":
        reasoner.transformer.compile_decode_layers()
    frames = np.random.default_rng(0).integers(0, 255, (8, 448, 448, 3), dtype=np.uint8)
    question = "What will the robot do next?"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": list(frames)}, "fps": 4.0},
                {"type": "text", "text": question},
            ],
        }
    ]

    def ref_inputs(batch: int):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return processor(
            text=[text] * batch,
            videos=[frames] * batch,
            return_tensors="pt",
            padding=True,
            video_metadata=[VideoMetadata(total_num_frames=8, fps=4.0)] * batch,
            num_frames=8,
            fps=None,
            cap_pixels_per_frame=False,
        ).to(device)

    def run_ref(batch: int, new_tokens: int):
        inputs = ref_inputs(batch)
        return ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run_ours(new_tokens: int):
        return reasoner.complete([messages], greedy(new_tokens), video_num_frames=8)

    def seconds(fn, *a):
        sync()
        start = time.perf_counter()
        out = fn(*a)
        sync()
        return time.perf_counter() - start, out

    def median_ms(fn, *a, repeat: int = 5) -> float:
        return round(statistics.median(seconds(fn, *a)[0] for _ in range(repeat)) * 1000, 1)

    with torch.inference_mode():
        prompt = reasoner.encode(messages, video_num_frames=8)
        prompt_tokens = len(prompt.input_ids)
        run_ref(1, 2), run_ours(2)  # warm-up (the Python API's scheduler captures its batch-1 graph)
        checks = correctness(ref, reasoner, ref_inputs, messages, args.parity_tokens)
        print(json.dumps({"correctness": checks}), flush=True)

        def first_token_of_encoded() -> None:
            out: queue.Queue = queue.Queue()
            reasoner.scheduler.submit(prompt, greedy(1), Row(0), out)
            while reasoner.scheduler.next(out)[1] is not END:
                pass

        ttft = {
            "transformers_ms": median_ms(run_ref, 1, 1),
            "transformers_processor_ms": median_ms(ref_inputs, 1),
            "cosmos3_ms": median_ms(run_ours, 1),
            "cosmos3_encode_ms": median_ms(reasoner.encode, messages, False, None, 8),
            "cosmos3_processor_ms": median_ms(reasoner.tokenize, messages, False, None, 8),
            "cosmos3_prefill_and_first_token_ms": median_ms(first_token_of_encoded),
        }
        print(json.dumps({"time_to_first_token": ttft}), flush=True)
        n = args.new_tokens
        ref_rates = {}
        for batch in (1, 16):
            first = seconds(run_ref, batch, 1)[0]
            total = seconds(run_ref, batch, n)[0]
            ref_rates[batch] = round(batch * (n - 1) / (total - first), 1)
        print(json.dumps({"transformers_decode_tok_s": ref_rates}), flush=True)

        # The scheduler as the server runs it: its own thread, one GPU lock shared with the prompts' encoding.
        lock = FairLock()
        most = min(max(levels), MAX_SLOTS)
        sizes = [1 << i for i in range(most.bit_length()) if 1 << i <= most] + ([most] if most & (most - 1) else [])
        runs = []
        for chunk in [int(c) for c in args.prefill_chunks.split(",")]:
            scheduler = Scheduler(
                reasoner.transformer, [], slots=most, lock=lambda: lock, prefill_chunk=chunk, encode=reasoner.embed_many
            )
            scheduler.reserve(most, prompt_tokens + args.serve_tokens + 1)  # the run's cache up front: no regrowth
            warm(scheduler, prompt, sizes)
            for requests in levels:
                scheduler.most_active = 0
                phases = Phases(scheduler, sync) if args.phases else None
                runs.append(concurrent(reasoner, scheduler, lock, messages, requests, args.serve_tokens))
                runs[-1]["prefill_chunk"] = chunk
                if phases is not None:
                    runs[-1]["phase_seconds"] = phases.report()
                    for phase in ("embed_queued", "admit", "step"):  # back to the unwrapped methods
                        delattr(scheduler, phase)
                print(json.dumps({"scheduler": runs[-1]}), flush=True)
            if chunk != int(args.prefill_chunks.split(",")[-1]):
                scheduler.close()
        buckets = {r: scheduler.bucket(min(r, most)) for r in levels}  # the rows a step runs over
        step_ms = step_gpu_ms(scheduler, sorted(set(buckets.values())))
        scheduler.close()
    print(json.dumps({"decode_step_gpu_ms_by_rows": step_ms}), flush=True)

    print(
        f"\n{gpu_name(device)}, torch {torch.__version__}, prompt {prompt_tokens} tokens (video 784), greedy, "
        f"decode step compiled: {reasoner.transformer.compiled_und_in is not None}; "
        f"transformers {args.new_tokens} new tokens, scheduler runs {args.serve_tokens} tokens per request"
    )
    print(
        f"greedy tokens equal to transformers' for the first {checks['scheduler_matches_transformers_for']} of "
        f"{args.parity_tokens}; CUDA graph steps equal eager steps: {checks['graph_steps_equal_eager_steps']}; "
        f"chunked prefill max |logit diff| {checks['chunked_prefill_max_abs_logit_diff']}\n"
    )
    by_requests = {r["requests"]: r for r in runs}
    alone = by_requests.get(1, {}).get("itl_ms_median")
    print_table(
        ["", "time to first token (ms)", "decode tok/s, batch 1", "decode tok/s, batch 16"],
        [
            ["transformers", ttft["transformers_ms"], ref_rates[1], ref_rates[16]],
            [
                "cosmos3 (scheduler)",
                ttft["cosmos3_ms"],
                round(1000 / alone, 1) if alone else "-",
                by_requests.get(16, {}).get("all_decoding_tok_s", "-"),
            ],
        ],
    )
    print()
    print_table(
        [
            "cosmos3 scheduler, concurrent requests",
            "prefill chunk",
            "TTFT median (ms)",
            "TTFT max (ms)",
            "inter-token (ms)",
            "aggregate tok/s",
            "tok/s while all decode",
            "GPU ms / step",
        ],
        [
            [
                r["requests"],
                r["prefill_chunk"],
                r["ttft_ms_median"],
                r["ttft_ms_max"],
                r["itl_ms_median"],
                r["aggregate_tok_s"],
                r["all_decoding_tok_s"],
                step_ms.get(buckets[r["requests"]], "-"),
            ]
            for r in runs
        ],
    )


if __name__ == "__main__":
    main()
