"""The Reasoner at Nano size: cosmos3 vs transformers' `generate`, same process, same (shared) random bf16 weights.

Time to first token for ~50 text tokens plus an 8-frame 448x448 video (784 video tokens), and greedy decode
tokens/s at batch 1 and batch 16. Both include pre-processing (the same Qwen3-VL processor) and the vision tower.

    python benchmarks/reasoner.py --new-tokens 64
    python benchmarks/reasoner.py --preset tiny --new-tokens 4     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import default_device, gpu_name, print_table

from cosmos3.config import preset
from cosmos3.loading.checkpoint import GENERATOR_ONLY
from cosmos3.loading.tiny import build_tokenizer, tiny_vision_config, vision_token_ids
from cosmos3.model.transformer import Cosmos3Transformer
from cosmos3.reasoning.reasoner import Reasoner, Sampling
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--preset", default="nano")
    args = parser.parse_args()
    from transformers.video_utils import VideoMetadata

    device = default_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ref, reasoner, processor = build(device, args.preset)
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

    def run_ours(batch: int, new_tokens: int):
        return reasoner.complete([messages] * batch, Sampling(max_tokens=new_tokens), video_num_frames=8)

    def seconds(fn, *a):
        sync()
        start = time.perf_counter()
        out = fn(*a)
        sync()
        return time.perf_counter() - start, out

    with torch.inference_mode():
        prompt_tokens = int(ref_inputs(1)["input_ids"].shape[1])
        results = {}
        for name, fn in (("transformers", run_ref), ("cosmos3", run_ours)):
            fn(1, 2)  # warm-up
            ttft = sorted(seconds(fn, 1, 1)[0] for _ in range(3))[1]
            total1, _ = seconds(fn, 1, args.new_tokens)
            total16, _ = seconds(fn, 16, args.new_tokens)
            ttft16, _ = seconds(fn, 16, 1)
            results[name] = {
                "ttft_ms": round(ttft * 1000, 1),
                "decode_tok_s_batch1": round((args.new_tokens - 1) / (total1 - ttft), 1),
                "decode_tok_s_batch16": round(16 * (args.new_tokens - 1) / (total16 - ttft16), 1),
            }
            print(json.dumps({name: results[name]}), flush=True)
        # Greedy tokens agree at the start (bf16: they may part later).
        ours_text = run_ours(1, 8)[0].text
        ref_ids = run_ref(1, 8)[0, prompt_tokens:]
        same = ours_text == reasoner.tokenizer.decode(ref_ids, skip_special_tokens=True)
    print(
        f"\n{gpu_name(device)}, torch {torch.__version__}, prompt {prompt_tokens} tokens "
        f"(video 784), {args.new_tokens} new tokens, first 8 greedy tokens identical: {same}"
    )
    print_table(
        ["", "time to first token (ms)", "decode tok/s, batch 1", "decode tok/s, batch 16"],
        [[name, r["ttft_ms"], r["decode_tok_s_batch1"], r["decode_tok_s_batch16"]] for name, r in results.items()],
    )


if __name__ == "__main__":
    main()
