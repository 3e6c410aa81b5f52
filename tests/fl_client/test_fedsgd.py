"""DP-FedSGD with an adaptive update: every bank applies the job's optimizer to the decrypted mean.

Checked here: the update equals plain PyTorch's Adam / SGD-momentum on the mean; two replicas fed
the same aggregates stay bit-equal, across a restart that reloads the optimizer state from the
replica file; a bank's released update respects the clamp the aggregate check relies on, so every
honest mean is accepted and a poisoned one rejected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_bank_policy import bank_config, make_job, train

from fedmoe.fl_client.aggregate_check import AggregateRejected, check_aggregate
from fedmoe.fl_client.bank import Bank
from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.fedopt import FedOptimizer, FedOptState, fed_step, update_clamp
from fedmoe.fl_client.state import load_tensors
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.messages import TrainStatus


def means(rounds: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=gen) * 0.02 + 0.005 for _ in range(rounds)]


@pytest.mark.parametrize("rule", ["adam", "sgdm"])
def test_the_update_is_plain_pytorch_on_the_mean(rule):
    opt = FedOptimizer(rule=rule, lr=0.03, beta1=0.9, beta2=0.99, eps=1e-6)
    start = torch.randn(64, dtype=torch.float64)
    reference = start.clone().requires_grad_(True)
    if rule == "adam":
        torch_opt = torch.optim.Adam([reference], lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    else:
        torch_opt = torch.optim.SGD([reference], lr=opt.lr, momentum=opt.beta1)
    state, ours = FedOptState.fresh(64), start.clone()
    for mean in means(6, 64):
        update, state = fed_step(opt, state, mean.double())
        ours = ours + update.double()
        reference.grad = -mean.double()  # the pseudo-gradient
        torch_opt.step()
        # float32 updates (what the replica adds) against torch's float64 parameter
        assert torch.allclose(ours, reference.detach(), rtol=0, atol=1e-6), (rule, (ours - reference).abs().max())
    assert state.step == 6
    assert not torch.allclose(ours, start, atol=1e-3)  # it moved


def test_the_mean_rule_adds_the_mean_as_it_is():
    mean = means(1, 32)[0]
    update, state = fed_step(FedOptimizer(rule="mean"), FedOptState.fresh(32), mean)
    assert torch.equal(update, mean) and state.step == 1


def job_at(root: Path, **overrides) -> JobConfig:
    fields = dict(job_id="fedsgd", model_preset="tiny", bank_state_root=str(root / "banks"), lr=0.05)
    return JobConfig(**(fields | overrides))


def bank_at(job: JobConfig, root: Path, name: str) -> BankConfig:
    return BankConfig.from_node_config({"bank-id": name, "state-dir": str(root / name)}, job)


def test_replicas_stay_bit_equal_and_the_optimizer_state_survives_a_restart(tmp_path):
    job = job_at(tmp_path)
    steady, restarted = Bank(job, bank_at(job, tmp_path, "bank-0")), Bank(job, bank_at(job, tmp_path, "bank-1"))
    aggregates = means(5, steady.view.numel, seed=1)
    for r, mean in enumerate(aggregates, start=1):
        steady.apply_mean_delta(r, mean)
        restarted.apply_mean_delta(r, mean)
        restarted.save()
        restarted = Bank(job, restarted.config)  # a fresh process per message: state from disk only
        assert restarted.state.applied_round == r and restarted.optimizer_state.step == r
    assert torch.equal(steady.view.flatten(), restarted.view.flatten())
    assert torch.equal(steady.optimizer_state.exp_avg, restarted.optimizer_state.exp_avg)
    assert torch.equal(steady.optimizer_state.exp_avg_sq, restarted.optimizer_state.exp_avg_sq)
    # a bank that forgot its optimizer state would take a different step from the same aggregate
    forgetful = Bank(job, restarted.config)
    forgetful.optimizer_state = FedOptState.fresh(forgetful.view.numel)
    extra = means(1, steady.view.numel, seed=2)[0]
    steady.apply_mean_delta(6, extra)
    forgetful.apply_mean_delta(6, extra)
    assert not torch.equal(steady.view.flatten(), forgetful.view.flatten())
    # an aggregate already applied is a no-op, state included
    restarted.apply_mean_delta(3, extra)
    assert restarted.optimizer_state.step == 5


def test_the_replica_file_holds_the_optimizer_state_and_a_broken_one_is_refused(tmp_path):
    job = job_at(tmp_path)
    bank = Bank(job, bank_at(job, tmp_path, "bank-0"))
    bank.apply_mean_delta(1, means(1, bank.view.numel)[0])
    bank.save()
    saved = load_tensors(bank.replica_file)
    assert int(saved["fedopt.step"].item()) == 1 and saved["fedopt.exp_avg"].dtype == torch.float64
    with pytest.raises(ConfigError, match="optimizer state expected tensors"):
        FedOptState.from_tensors({"fedopt.exp_avg": saved["fedopt.exp_avg"]}, bank.view.numel, source="x")
    with pytest.raises(ConfigError, match=r"expected shape \(7,\)"):
        FedOptState.from_tensors(saved, 7, source="x")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("update-rule", "fedprox", r"'update-rule' expected one of \['adam', 'sgdm', 'mean'\], got 'fedprox'"),
        ("beta1", 1.0, r"'beta1' expected in \[0, 1\), got 1.0"),
        ("local-lr", 0.0, r"'local-lr' expected > 0, got 0.0"),
        ("physical-batch-size", -1, r"'physical-batch-size' expected >= 0"),
    ],
)
def test_bad_round_options_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_run_config({key: value})


@pytest.fixture(scope="module")
def noisy_round(tmp_path_factory):
    """A real CKKS train message of a bank whose DP noise is far above the clamp (batch 1, epsilon 0.5)."""
    from fedmoe.crypto import keygen

    root = tmp_path_factory.mktemp("noisy")
    keygen(root / "keys")
    job = make_job(root / "keys", root, batch_size=1, epsilon=0.5, local_steps=1, min_banks=2)
    bank = bank_config(job, root, "keep-plaintext-deltas = true\n")  # a bank policy setting, never a job's
    assert train(job, bank).status is TrainStatus.OK
    delta = load_tensors(bank.job_dir(job.job_id) / "deltas" / "round-0001.safetensors")["delta"]
    return job, delta


def test_a_released_update_is_clamped_so_every_honest_mean_passes_the_check(noisy_round):
    job, delta = noisy_round
    bound = update_clamp(job)
    assert delta.abs().max() <= bound
    assert (delta.abs() == bound).float().mean() > 0.05  # the noise was far above it: the clamp did bind
    # any mean of honest (clamped) updates is within the bound: accepted
    honest = np.stack([delta.numpy(), -delta.numpy(), np.full_like(delta.numpy(), bound)])
    check_aggregate(job, 1, honest.mean(axis=0), total_weight=3.0)
    check_aggregate(job, 1, np.full_like(delta.numpy(), -bound), total_weight=2.0)


@pytest.mark.parametrize("factor", [1e6, 3.0])
def test_a_poisoned_aggregate_is_rejected(noisy_round, factor):
    job, delta = noisy_round
    # one bank skips the clamp and scales its update: the mean leaves the honest range
    poisoned = (delta.numpy() * factor + delta.numpy()) / 2
    with pytest.raises(AggregateRejected, match="above the bound"):
        check_aggregate(job, 1, poisoned, total_weight=2.0)


def test_the_local_update_is_plain_sgd_at_local_lr_and_the_physical_batch_only_splits_memory(tmp_path):
    from fedmoe.fl_client.fedopt import local_dp_config
    from fedmoe.fl_client.task import dp_config

    job = job_at(tmp_path, batch_size=32, physical_batch_size=8, local_lr=0.5)
    cfg = local_dp_config(job, dp_config(job, bank_at(job, tmp_path, "bank-0")))
    assert (cfg.optimizer, cfg.lr, cfg.momentum) == ("sgd", 0.5, 0.0)
    assert (cfg.expected_batch_size, cfg.physical_batch_size) == (32, 8)  # sigma is calibrated for 32
    old = job_at(tmp_path, update_rule="mean", batch_size=32)
    cfg = local_dp_config(old, dp_config(old, bank_at(old, tmp_path, "bank-0")))
    assert (cfg.optimizer, cfg.lr, cfg.physical_batch_size) == ("adamw", old.lr, 32)
