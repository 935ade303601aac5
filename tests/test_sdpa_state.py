"""cosmos3 leaves torch's process-global attention settings as it found them.

torch picks the SDPA kernel from a process-global priority order that it initialises lazily, at its first own
choice of the process (cuDNN first on Hopper and Blackwell with a recent cuDNN). cosmos3 once set its order with
`sdpa_kernel(..., set_priority=True)`; run before torch's first choice, that restored the not-yet-initialised order
(flash first), and every other library's attention in the process ran on flash from then on: diffusers' 720p step
took 9.2 s instead of 6.5 s (benchmarks/README.md, "2026-12-03, night"). The state is per process and set once, so
each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's SDPA choice is made on a CUDA GPU")

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Prints torch's choice for an attention call shaped as diffusers' Cosmos 3 attention makes it (32 query heads on 8
# grouped KV heads of 128, bf16) and the priority order, after running `argv[1]` first: nothing, one cosmos3
# attention call, or a whole text2image request of the tiny model on the GPU (graphs, compile regions and all).
SCRIPT = """
import json, sys, torch
from torch.nn.attention import SDPBackend

def choice():
    q = torch.zeros(1, 256, 32, 128, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3)
    kv = torch.zeros(1, 300, 8, 128, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3)
    return SDPBackend(torch._fused_sdp_choice(q, kv, kv, None, 0.0, False, enable_gqa=True)).name

first = sys.argv[1]
if first == "attention":
    from cosmos3.model.layers import attention
    q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 80, 2, 64, device="cuda", dtype=torch.bfloat16)
    attention(q, kv, kv)
elif first == "request":
    import cosmos3
    engine = cosmos3.load("tiny", device="cuda")
    for _ in range(2):  # the second request replays its passes from a CUDA graph
        engine.generate(mode="text2image", prompt="a cup", height=64, width=96, num_steps=3, seed=0)
print(json.dumps({"choice": choice(), "order": torch._C._get_sdp_priority_order()}))
"""


def state_after(first: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, first], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("first", ["attention", "request"])
def test_torch_chooses_as_in_a_fresh_process_after_cosmos3(first: str) -> None:
    fresh = state_after("nothing")
    assert state_after(first) == fresh
