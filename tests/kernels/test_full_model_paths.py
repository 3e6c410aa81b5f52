"""The whole model with each kernel path equals the model on the PyTorch reference path."""

from __future__ import annotations

import pytest
import torch

from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.lora import LoraConfig, configure_trainable


def logits_and_grads(backend: str, monkeypatch, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setenv("FEDMOE_KERNELS", backend)
    torch.manual_seed(0)
    # widths 64/32/8 keep every GEMM 16-byte aligned, so grouped_mm qualifies on CPU
    model = configure_trainable(DeepseekForCausalLM(preset("tiny")), mode, LoraConfig(rank=8, seed=1))
    if mode == "lora":  # non-zero B so the adapters' paths carry signal
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    logits = model(ids[:, :-1])
    lm_loss(logits, ids[:, 1:]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_model_matches_reference_path(backend, mode, monkeypatch):
    ref_logits, ref_grads = logits_and_grads("reference", monkeypatch, mode)
    logits, grads = logits_and_grads(backend, monkeypatch, mode)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if ".experts." in n]
    assert expert_grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
