"""The training allocator setting (fedmoe/fl_client/memory.py), in fresh processes: a step's
temporaries come from memory the last step freed, and the kept memory goes back when training ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.fl_client.memory import _glibc

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc only (elsewhere nothing is changed)")

# Three DP-SGD steps of FFA-LoRA on the `small` preset (8 x 64 tokens) after two warm-up steps.
_STEPS = """
import json, resource, sys, warnings, torch
from fedmoe.fl_client import memory
from fedmoe.fl_client.dp import DPConfig, make_private
from fedmoe.model.deepseek import DeepseekForCausalLM, preset
from fedmoe.model.lora import LoraConfig, configure_trainable

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
if sys.argv[1] == "reuse":
    assert memory.keep_freed_memory()
torch.manual_seed(0)
model = DeepseekForCausalLM(preset("small"))
configure_trainable(model, "lora", LoraConfig(rank=8))
tokens = torch.randint(0, model.config.vocab_size, (8, 64))
cfg = DPConfig(target_epsilon=1.0, delta=1e-5, expected_batch_size=8, physical_batch_size=8,
               grad_sample_mode="mixed", optimizer="adamw", secure_mode=True)
private = make_private(model, cfg, noise_multiplier=1.0, seq_len=64, generator=None)

def step():
    private.backward(tokens, tokens)
    private.optimizer.step()
    private.optimizer.zero_grad(set_to_none=True)

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
private.close()
kept = rss_mb()
memory.release_freed_memory()
print(json.dumps({"faults": faults, "kept_mb": kept, "after_release_mb": rss_mb()}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_steps_reuse_freed_memory_and_training_gives_it_back():
    default, reuse = _run("default"), _run("reuse")
    # Measured: 6,800-12,200 faults per step by glibc's default, 350-860 with reuse.
    assert default["faults"] > 3000, default
    assert reuse["faults"] < default["faults"] / 4, (reuse, default)
    assert reuse["kept_mb"] - reuse["after_release_mb"] > 10, reuse  # malloc_trim gave memory back
