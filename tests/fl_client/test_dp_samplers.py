"""Per-sample gradients and norms of every trainable fedmoe layer vs a microbatch loop (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from test_dp_helpers import reference_per_sample_grads, single_thread, tiny_model, token_batch, total_norms, trainable  # noqa: F401  (single_thread: autouse fixture)

from fedmoe.fl_client.dp import DPConfig, DPError, check_model, plan_norm_methods
from fedmoe.fl_client.dp.bookkeeping import BookKeepingClipper
from fedmoe.fl_client.dp.samplers.common import NORM_METHOD_ATTR, ghost_is_cheaper
from fedmoe.fl_client.dp.samplers.expert import expert_grad_norm2_bucketed
from fedmoe.kernels import expert_grad_sample, expert_weight_grad_clipped
from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.lora import configure_trainable

MODES = ["lora", "router+experts", "full"]
ROUTINGS = {
    "v3-group-limited": {},  # tiny preset: sigmoid, noaux_tc, n_group=4, topk_group=2
    "v2-group-greedy": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2),
}
B, T = 5, 12


# ---------------------------------------------------------------------------------------------
# The expert-bank ops the samplers call, against per-token outer products
# ---------------------------------------------------------------------------------------------


def outer_product_loop(x, g, ids, sample_ids, n_samples, n_experts):
    out = torch.zeros(n_samples, n_experts, g.shape[1], x.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        out[sample_ids[n], ids[n]] += torch.outer(g[n], x[n])
    return out


@pytest.mark.parametrize(("width_in", "width_out", "positions"), [(4, 24, 5), (24, 4, 5), (4, 24, None), (12, 12, 3)])
def test_linear_grad_sample_matches_single_sample_backward(width_in, width_out, positions):
    """Our nn.Linear sampler (bmm, input side first for a rank-wide input) against a loop of
    single-sample backward passes, with and without a position axis and a bias."""
    gen = torch.Generator().manual_seed(width_in)
    layer = torch.nn.Linear(width_in, width_out).double()
    shape = (3, positions, width_in) if positions else (3, width_in)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn((*shape[:-1], width_out), generator=gen, dtype=torch.float64)
    got = GradSampleModule.GRAD_SAMPLERS[torch.nn.Linear](layer, [x], g)
    for b in range(3):
        layer.zero_grad()
        (layer(x[b : b + 1]) * g[b : b + 1]).sum().backward()
        torch.testing.assert_close(got[layer.weight][b], layer.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[layer.bias][b], layer.bias.grad, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n_samples=st.integers(1, 4),
    rows=st.integers(1, 9),
    n_experts=st.integers(1, 6),
    width_in=st.integers(1, 7),
    width_out=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_expert_ops_match_outer_products(n_samples, rows, n_experts, width_in, width_out, seed):
    gen = torch.Generator().manual_seed(seed)
    N = n_samples * rows
    x = torch.randn(N, width_in, generator=gen, dtype=torch.float64)
    g = torch.randn(N, width_out, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, n_experts, (N,), generator=gen)  # some experts get no rows
    sample_ids = torch.arange(n_samples).repeat_interleave(rows)
    expected = outer_product_loop(x, g, ids, sample_ids, n_samples, n_experts)
    got = expert_grad_sample(x, g, ids, sample_ids, n_samples, n_experts)
    assert got.shape == (n_samples, n_experts, width_out, width_in)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    norm2 = expert_grad_norm2_bucketed(x, g, ids, sample_ids, n_samples, n_experts)
    torch.testing.assert_close(norm2, expected.reshape(n_samples, -1).pow(2).sum(1), rtol=1e-10, atol=1e-12)
    factors = torch.rand(n_samples, generator=gen, dtype=torch.float64)
    clipped = expert_weight_grad_clipped(x, g, ids, sample_ids, factors, n_experts)
    torch.testing.assert_close(clipped, torch.einsum("b,b...->...", factors, expected), rtol=0, atol=1e-12)


def test_bucketed_ghost_norm_on_empty_input():
    x, g = torch.zeros(0, 3), torch.zeros(0, 2)
    ids = sample_ids = torch.zeros(0, dtype=torch.long)
    assert expert_grad_norm2_bucketed(x, g, ids, sample_ids, 0, 4).shape == (0,)
    assert expert_grad_norm2_bucketed(x, g, ids, sample_ids, 2, 4).abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Whole model: hooks (instantiated) and ghost / mixed (norms) vs the microbatch loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("mode", MODES)
def test_hooks_per_sample_grads_match_microbatch_loop(mode, routing):
    model = tiny_model(mode, **ROUTINGS[routing])
    inputs, targets = token_batch(B, T)
    expected = reference_per_sample_grads(model, inputs, targets)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lm_loss(gsm(inputs), targets, reduction="per_sample").mean().backward()
        params = trainable(model)
        assert params.keys() == expected.keys()
        for name, p in params.items():
            assert p.grad_sample.shape == (B, *p.shape), name  # samples, never tokens
            err = (p.grad_sample - expected[name]).abs().max().item()
            assert err < 1e-6, f"{name}: max abs error {err:.3g}"
    finally:
        gsm.cleanup()


@pytest.mark.parametrize("plan_kind", ["ghost", "mixed", "alternating"])
@pytest.mark.parametrize("mode", MODES)
def test_fast_clipping_norms_match_microbatch_loop(mode, plan_kind):
    model = tiny_model(mode)
    inputs, targets = token_batch(B, T, seed=1)
    expected = reference_per_sample_grads(model, inputs, targets)
    plan = plan_norm_methods(model, mode="ghost" if plan_kind == "ghost" else "mixed", seq_len=T)
    if plan_kind == "alternating":  # both norm methods on every layer kind, whatever the cost rule says
        plan = {name: ("ghost", "instantiate")[i % 2] for i, name in enumerate(plan)}
    modules = dict(model.named_modules())
    for name, method in plan.items():
        setattr(modules[name], NORM_METHOD_ATTR, method)
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", strict=False, max_grad_norm=1.0, use_ghost_clipping=True
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lm_loss(gsm(inputs), targets, reduction="per_sample").mean().backward()  # the norm pass
        for name, p in trainable(model).items():
            ref = expected[name].reshape(B, -1).norm(dim=1)
            got = p._norm_sample
            assert got.shape == (B,), name
            rel = ((got - ref).abs() / ref.clamp(min=1e-30)).max().item()
            assert rel < 1e-6, f"{name}: max rel error {rel:.3g}"
        total = gsm.get_norm_sample()
        ref_total = total_norms(expected)
        assert ((total - ref_total).abs() / ref_total).max().item() < 1e-6
    finally:
        gsm.cleanup()
        for module in model.modules():
            module.__dict__.pop(NORM_METHOD_ATTR, None)


@pytest.mark.parametrize("mode", MODES)
def test_book_keeping_norms_and_clipped_sum_match_microbatch_loop(mode):
    model = tiny_model(mode)
    inputs, targets = token_batch(B, T, seed=4)
    expected = reference_per_sample_grads(model, inputs, targets)
    plan = plan_norm_methods(model, mode="mixed", seq_len=T)
    plan = {name: ("ghost", "instantiate")[i % 2] for i, name in enumerate(plan)}
    modules = dict(model.named_modules())
    for name, method in plan.items():
        setattr(modules[name], NORM_METHOD_ATTR, method)
    ref_norms = total_norms(expected)
    clip = float(ref_norms.median())
    clipper = BookKeepingClipper(model, clip_norm=clip)
    try:
        norms = clipper.clip_backward(lm_loss(clipper(inputs), targets, reduction="per_sample"))
        assert ((norms - ref_norms).abs() / ref_norms).max().item() < 1e-6
        factors = (clip / (ref_norms + 1e-6)).clamp(max=1.0)
        for name, p in trainable(model).items():
            clipped_sum = torch.einsum("b,b...->...", factors, expected[name])
            assert (p.grad - clipped_sum).abs().max().item() < 1e-6, name
    finally:
        clipper.cleanup()
        for module in model.modules():
            module.__dict__.pop(NORM_METHOD_ATTR, None)


@pytest.mark.parametrize("mode", ["lora", "router+experts"])
def test_book_keeping_in_float32_runs_the_fast_paths_and_agrees(mode):
    # float32 takes the kernels' grouped_mm paths and the bucketed ghost norm (float64 cannot).
    inputs, targets = token_batch(B, T, seed=5)
    expected = reference_per_sample_grads(tiny_model(mode), inputs, targets)
    model = tiny_model(mode, dtype=torch.float32)
    plan = plan_norm_methods(model, mode="mixed", seq_len=T)
    modules = dict(model.named_modules())
    for i, name in enumerate(plan):
        setattr(modules[name], NORM_METHOD_ATTR, ("ghost", "instantiate")[i % 2])
    ref_norms = total_norms(expected)
    clipper = BookKeepingClipper(model, clip_norm=float(ref_norms.median()))
    try:
        norms = clipper.clip_backward(lm_loss(clipper(inputs), targets, reduction="per_sample"))
        torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=0)
        factors = (float(ref_norms.median()) / (ref_norms + 1e-6)).clamp(max=1.0)
        for name, p in trainable(model).items():
            clipped_sum = torch.einsum("b,b...->...", factors, expected[name])
            torch.testing.assert_close(p.grad.double(), clipped_sum, rtol=1e-3, atol=1e-5, msg=name)
    finally:
        clipper.cleanup()


# ---------------------------------------------------------------------------------------------
# Model checks and the mixed plan
# ---------------------------------------------------------------------------------------------


def test_ghost_rule_on_small_preset_shapes():
    cfg = preset("small")
    rows = 128 * cfg.num_experts_per_tok
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert ghost_is_cheaper(rows_per_sample=rows, n_experts=E, in_features=D, out_features=2 * F)  # gate_up
    assert ghost_is_cheaper(rows_per_sample=rows, n_experts=E, in_features=F, out_features=D)  # down
    assert not ghost_is_cheaper(rows_per_sample=rows, n_experts=E, in_features=8, out_features=D)  # LoRA B
    assert not ghost_is_cheaper(rows_per_sample=128, n_experts=1, in_features=8, out_features=D)  # LoRA B linear
    assert not ghost_is_cheaper(rows_per_sample=4096, n_experts=1, in_features=D, out_features=cfg.vocab_size)


def test_plan_is_per_layer_and_empty_for_hooks():
    model = tiny_model("full")
    assert plan_norm_methods(model, mode="hooks", seq_len=T) == {}
    ghost = plan_norm_methods(model, mode="ghost", seq_len=T)
    assert set(ghost.values()) == {"ghost"} and "model.layers.1.mlp.experts.gate_up_proj" in ghost
    assert "model.layers.1.mlp.gate.weight" not in ghost  # the router always instantiates


def test_check_model_refuses_layers_without_a_sampler():
    model = DeepseekForCausalLM(preset("tiny"))
    configure_trainable(model, "router+experts")
    model.model.layers[0].extra = torch.nn.Bilinear(2, 2, 2)
    cfg = DPConfig(target_epsilon=1.0, delta=1e-5, bank_id="bank-a")
    with pytest.raises(
        DPError, match=r"bank 'bank-a': layer model\.layers\.0\.extra \(Bilinear\).*supported: \[.*ExpertLinear"
    ):
        check_model(model, cfg)


def test_check_model_refuses_nested_trainable_layers():
    model = DeepseekForCausalLM(preset("tiny"))
    configure_trainable(model, "lora")
    expert_bank = model.model.layers[1].mlp.experts.gate_up_proj
    expert_bank.weight.requires_grad_(True)  # base bank and its lora_B both trainable
    with pytest.raises(DPError, match=r"sublayers \['lora_B'\]"):
        check_model(model, DPConfig(target_epsilon=1.0, delta=1e-5))


def test_check_model_refuses_tied_weights_under_ghost_clipping():
    model = DeepseekForCausalLM(preset("tiny", tie_word_embeddings=True))
    configure_trainable(model, "full")
    with pytest.raises(DPError, match="tied"):
        check_model(model, DPConfig(target_epsilon=1.0, delta=1e-5, grad_sample_mode="ghost"))
    check_model(model, DPConfig(target_epsilon=1.0, delta=1e-5, grad_sample_mode="hooks"))
