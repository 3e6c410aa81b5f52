"""Run config (pyproject) <-> JobConfig, node config <-> BankConfig."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fl_client.config import BankConfig, JobConfig
from fl_client.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_is_exactly_the_job_config():
    run_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    job = JobConfig.from_run_config(run_config)
    assert set(run_config) == set(job.to_run_config()), "pyproject keys and JobConfig fields differ"
    assert job.to_run_config() == run_config


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("num-rounds", "three", r"'num-rounds' expected an integer, got 'three'"),
        ("dp", "maybe", r"'dp' expected true/false"),
        ("delta", 2.0, r"'delta' expected in \(0, 1\), got 2.0"),
        ("privacy-unit", "household", r"'privacy-unit' expected 'record' or 'customer'"),
    ],
)
def test_bad_run_config_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_run_config({key: value})


def test_node_config_defaults_and_errors(tmp_path):
    job = JobConfig(key_dir=str(tmp_path / "keys"), bank_state_root=str(tmp_path / "banks"))
    bank = BankConfig.from_node_config({"partition-id": 2}, job)
    assert bank.bank_id == "bank-2" and bank.state_dir == tmp_path / "banks" / "demo" / "bank-2"
    assert bank.key_path == tmp_path / "keys" / "context.secret.ckks" and bank.epsilon == job.epsilon
    sim = BankConfig.from_node_config({"partition-id": 0, "num-partitions": 64}, job)
    assert sim.torch_threads == 1  # simulated banks share the host
    with pytest.raises(ConfigError, match="'epsilon' expected > 0, got -1.0"):
        BankConfig.from_node_config({"bank-id": "b", "epsilon": -1}, job)
    with pytest.raises(ConfigError, match="node config of b: epsilon/delta"):
        BankConfig.from_node_config({"bank-id": "b", "delta": "tiny"}, job)


def test_node_config_rejects_bad_delta_and_counts(tmp_path):
    job = JobConfig(key_dir=str(tmp_path / "keys"))
    with pytest.raises(ConfigError, match=r"'delta' expected in \(0, 1\), got 2.0"):
        BankConfig.from_node_config({"bank-id": "b", "delta": 2}, job)
    with pytest.raises(ConfigError, match="'planned-rounds'/'torch-threads' expected >= 0, got -1/0"):
        BankConfig.from_node_config({"bank-id": "b", "planned-rounds": -1}, job)
