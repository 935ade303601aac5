"""The Qwen3-VL vision tower on N videos at once against N calls of one: what batching the Reasoner's prompt encoding
across waiting requests buys (seconds per call, per video, and where one call's time goes).

Random bf16 weights of the default Qwen3-VL vision config (Nano's, 27 blocks of width 1152) with Nano's output width;
each video is 8 frames of 448x448 (784 tokens after merging), read by the Qwen3-VL video processor.

    python benchmarks/vision_tower.py                        # H100 / H200: under a minute
    python benchmarks/vision_tower.py --preset tiny --batches 1,2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from common import default_device, gpu_name, print_table

from cosmos3.config import preset
from cosmos3.loading.tiny import tiny_vision_config
from cosmos3.reference import randomize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one single-video call")
    args = parser.parse_args()
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, Qwen3VLVisionRotaryEmbedding
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(args.preset)
    if args.preset == "nano":
        vision_config = dict(out_hidden_size=cfg.hidden_size, deepstack_visual_indexes=[8, 16, 24])
    else:
        vision_config = {k: v for k, v in tiny_vision_config(cfg.hidden_size).items() if k != "model_type"}
    config = Qwen3VLVisionConfig(**vision_config)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        vision = Qwen3VLVisionModel(config)
    vision = vision.to(dtype).to_empty(device=device)
    randomize(vision, seed=0)
    vision.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config).to(device)
    vision.eval()
    processor = Qwen3VLVideoProcessor(
        patch_size=config.patch_size,
        merge_size=config.spatial_merge_size,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 4096, "longest_edge": 8 * 448 * 448},
    )
    frames = np.random.default_rng(0).integers(0, 255, (8, 448, 448, 3), dtype=np.uint8)
    one = processor(
        videos=[frames],
        video_metadata=[VideoMetadata(total_num_frames=8, fps=4.0)],
        num_frames=8,
        fps=None,
        return_tensors="pt",
    )
    pixels = one["pixel_values_videos"].to(device, dtype)
    grid = one["video_grid_thw"].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def call(n: int):
        return vision(pixels.repeat(n, 1), grid_thw=grid.repeat(n, 1))

    def seconds(fn, *a, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            fn(*a)
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    rows = []
    with torch.inference_mode():
        for n in [int(b) for b in args.batches.split(",")]:
            call(n)  # warm-up
            batched = seconds(call, n)
            row = {"videos": n, "one_call_s": round(batched, 4), "per_video_ms": round(batched / n * 1000, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                call(1)
                sync()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    single = rows[0]["per_video_ms"]
    print(f"\n{gpu_name(device)}, torch {torch.__version__}: Qwen3-VL vision tower, 8-frame 448x448 videos\n")
    print_table(
        ["videos in one call", "seconds", "ms per video", "vs one at a time"],
        [[r["videos"], r["one_call_s"], r["per_video_ms"], round(r["per_video_ms"] / single, 3)] for r in rows],
    )


if __name__ == "__main__":
    main()
