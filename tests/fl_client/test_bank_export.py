"""A bank exports the job's global model from its state dir, with no further training round."""

from __future__ import annotations

import json

import torch
from test_bank_policy import bank_config, make_job, train

from fedmoe.fl_client.bank import Bank
from fedmoe.fl_client.export import main
from fedmoe.fl_client.state import load_tensors
from fedmoe.model.checkpoint import load_pretrained
from fedmoe.protocol.messages import TrainStatus


def test_the_exported_merged_model_has_the_banks_adapted_logits(tmp_path):
    from fedmoe.crypto import keygen

    keygen(tmp_path / "keys")
    job = make_job(tmp_path / "keys", tmp_path)
    bank_cfg = bank_config(job, tmp_path)
    assert train(job, bank_cfg).status is TrainStatus.OK
    # make the replica differ from the base: a trained-like LoRA B (the aggregate would do this)
    bank = Bank(job, bank_cfg)
    bank.view.load_flat_(torch.randn(bank.view.numel) * 0.05)
    bank.apply_mean_delta(bank.state.applied_round + 1, torch.randn(bank.view.numel) * 0.01)
    bank.save()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job.to_run_config()), encoding="utf-8")
    node = f"bank-id='bank-0' state-dir='{bank_cfg.state_root}'"
    assert main(["--job", str(job_file), "--node-config", node, "--out", str(tmp_path / "final")]) == 0

    reloaded_bank = Bank(job, bank_cfg)
    reloaded = reloaded_bank.model.eval()
    merged = load_pretrained(tmp_path / "final" / "merged").eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (merged(tokens) - reloaded(tokens)).abs().max() < 1e-4
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()
    # the update rule's optimizer state travels with the model (Adam's moments after the last aggregate)
    exported = load_tensors(tmp_path / "final" / "optimizer.safetensors")
    assert torch.equal(exported["fedopt.exp_avg"], reloaded_bank.optimizer_state.exp_avg)
    assert int(exported["fedopt.step"].item()) == reloaded_bank.optimizer_state.step == 1
    assert main(["--job", str(job_file), "--node-config", "bank-id='nobody'", "--out", str(tmp_path / "x")]) == 2
