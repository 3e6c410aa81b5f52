"""DP per-sample gradients of the GQA / Qwen2-MoE layers against a loop of single-sample backward passes.

The new layers are built from module types the samplers in fedmoe.fl_client.dp.samplers already
cover (nn.Linear for q/k/v/o and the shared-expert gate, RMSNorm, Router, ExpertLinear), so no
new sampler exists; these tests are what shows that is enough (float64, every trainable mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

from fedmoe.fl_client.dp import DPConfig, check_model, plan_norm_methods
from fedmoe.fl_client.dp.samplers.common import NORM_METHOD_ATTR
from fedmoe.model.deepseek import DeepseekForCausalLM, ModelConfig, lm_loss
from fedmoe.model.lora import LoraConfig, configure_trainable
from fedmoe.model.quant import quantize_frozen_
from tests.fl_client.test_dp_helpers import reference_per_sample_grads, trainable  # the single-sample loop

GQA_MOE = ModelConfig(
    model_type="qwen2_moe",
    attention="gqa",
    vocab_size=320,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    qkv_bias=True,
    rope_interleave=False,
    moe_intermediate_size=16,
    n_shared_experts=1,
    shared_expert_intermediate_size=24,
    shared_expert_gate=True,
    n_routed_experts=6,
    num_experts_per_tok=2,
    scoring_func="softmax",
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    first_k_dense_replace=1,
)
LORA = LoraConfig(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts", "mlp"))
MODES = ["lora", "router+experts", "full", "lora-int8"]  # lora-int8: LoRA over the int8 frozen base
B, T = 5, 10


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gqa_model(mode: str) -> DeepseekForCausalLM:
    torch.manual_seed(0)
    model = DeepseekForCausalLM(GQA_MOE).double()
    configure_trainable(model, mode.removesuffix("-int8"), LORA if mode.startswith("lora") else None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "shared_expert_gate" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.05)
    if mode.endswith("-int8"):
        assert quantize_frozen_(model)
    return model.train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randint(0, 320, (B, T), generator=gen)
    targets = torch.randint(0, 320, (B, T), generator=gen)
    targets[1, -2:] = -100
    return inputs, targets


@pytest.mark.parametrize("mode", MODES)
def test_hooks_per_sample_grads_match_the_loop(mode):
    model = gqa_model(mode)
    check_model(model, DPConfig(target_epsilon=1.0, delta=1e-5, grad_sample_mode="hooks"))
    names = set(trainable(model))
    if mode.startswith("lora"):
        assert any("self_attn.k_proj.lora_B" in n for n in names) and any("self_attn.v_proj.lora_B" in n for n in names)
    if mode == "full":
        assert any("shared_expert_gate" in n for n in names) and any("k_proj.bias" in n for n in names)
    inputs, targets = batch()
    expected = reference_per_sample_grads(model, inputs, targets)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lm_loss(gsm(inputs), targets, reduction="per_sample").mean().backward()
        for name, p in trainable(model).items():
            err = (p.grad_sample - expected[name]).abs().max().item()
            assert err < 1e-6, f"{name}: max abs error {err:.3g}"  # as tests/fl_client (routers score in fp32)
    finally:
        gsm.cleanup()


@pytest.mark.parametrize("mode", MODES)
def test_ghost_and_mixed_norms_match_the_loop(mode):
    model = gqa_model(mode)
    inputs, targets = batch()
    expected = reference_per_sample_grads(model, inputs, targets)
    plan = plan_norm_methods(model, mode="mixed", seq_len=T)
    plan = {name: ("ghost", "instantiate")[i % 2] for i, name in enumerate(plan)}  # both methods on every kind
    modules = dict(model.named_modules())
    for name, method in plan.items():
        setattr(modules[name], NORM_METHOD_ATTR, method)
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", strict=False, max_grad_norm=1.0, use_ghost_clipping=True
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lm_loss(gsm(inputs), targets, reduction="per_sample").mean().backward()
        for name, p in trainable(model).items():
            ref = expected[name].reshape(B, -1).norm(dim=1)
            rel = ((p._norm_sample - ref).abs() / ref.clamp(min=1e-30)).max().item()
            assert rel < 1e-6, f"{name}: max rel error {rel:.3g}"
    finally:
        gsm.cleanup()
