"""Shared helpers for the DP tests: tiny float64 models and the microbatch-loop reference.

The reference runs the plain model (no Opacus) on one sample at a time and takes autograd's
gradient of that sample's loss: an independent per-sample gradient. (torch.func's
vmap(grad(functional_call(...))) cannot be used: routing mutates the load counter and the
expert dispatch has data-dependent shapes -- bincount, .tolist() -- which vmap refuses.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.lora import LoraConfig, configure_trainable


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: intra-op threads only add barrier waits, which on a busy 2-core CI box cost
    ~100x per op (measured: a [8, 64] linear takes 11 us on one thread, 1.6 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# LoRA on every kind of target: attention projections, routed experts, shared experts, dense MLP.
ALL_LORA = LoraConfig(
    rank=4, targets=("q_a_proj", "q_b_proj", "kv_b_proj", "o_proj", "experts", "shared_experts", "mlp")
)


def tiny_model(mode: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> DeepseekForCausalLM:
    """The tiny preset (group-limited noaux_tc routing unless overridden) in `mode`, with nonzero
    LoRA B factors and a nonzero routing correction bias so every gradient path is exercised."""
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(preset("tiny", **overrides)).to(dtype)
    configure_trainable(model, mode, ALL_LORA if mode == "lora" else None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.05)
        for router in model.routers():
            if router.uses_bias:
                router.e_score_correction_bias.copy_(
                    torch.randn(router.e_score_correction_bias.shape, generator=gen) * 0.01
                )
    return model.train()


def token_batch(n: int, seq_len: int, *, vocab: int = 320, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs/targets [n, L]; sample i has its last i % 4 targets ignored (-100)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (n, seq_len), generator=gen)
    targets = torch.randint(0, vocab, (n, seq_len), generator=gen)
    for i in range(n):
        if i % 4:
            targets[i, seq_len - i % 4 :] = -100
    return inputs, targets


def packed(n: int, seq_len: int, *, seed: int = 0) -> SimpleNamespace:
    """A stand-in for fedmoe.fl_client.data.PackedData: one unit (record) per sample."""
    inputs, targets = token_batch(n, seq_len, seed=seed)
    return SimpleNamespace(
        inputs=inputs,
        targets=targets,
        unit_ids=[f"record-{i}" for i in range(n)],
        record_indices=[[i] for i in range(n)],
    )


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def reference_per_sample_grads(
    model: DeepseekForCausalLM, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]}: autograd gradient of each sample's mean loss, one sample at a time."""
    params = trainable(model)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for b in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        lm_loss(model(inputs[b : b + 1]), targets[b : b + 1], reduction="per_sample")[0].backward()
        for name, p in params.items():
            grads[name].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(g) for name, g in grads.items()}


def total_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample L2 norm [B] over all parameters."""
    return torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)


def test_reference_is_batch_independent():
    # The reference is only a reference if a sample's gradient does not depend on its batch.
    model = tiny_model("router+experts")
    inputs, targets = token_batch(3, 8)
    full = reference_per_sample_grads(model, inputs, targets)
    again = reference_per_sample_grads(model, inputs[1:], targets[1:])
    for name in full:
        torch.testing.assert_close(full[name][1:], again[name], rtol=0, atol=1e-12)


def test_step_progress_logs_a_tenth_of_the_round_at_a_time_with_the_time_left(caplog):
    from fedmoe.fl_client.dp.trainer import StepProgress

    progress = StepProgress(total=20, bank_id="bank-7")
    with caplog.at_level("INFO", logger="fedmoe.fl_client.dp.trainer"):
        for step in range(1, 21):
            progress.step(step, mean_loss=5.0 - step / 100)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [f"bank-7: step {k}/20" for k in range(2, 21, 2)]
    assert lines[-1] == "bank-7: step 20/20, loss so far 4.800, ~0 s left"
