"""Run config (pyproject) <-> JobConfig, node config <-> BankConfig."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmoe.fl_client.config import BankConfig, JobConfig
from fedmoe.fl_client.errors import ConfigError
from fedmoe.fl_client.policy import BankPolicy

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


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
    assert bank.bank_id == "bank-2" and bank.state_root == tmp_path / "banks" / "bank-2"
    assert bank.job_dir("demo") == tmp_path / "banks" / "bank-2" / "jobs" / "demo"
    assert bank.key_path == tmp_path / "keys" / "context.secret.ckks"
    assert bank.policy == BankPolicy()  # no policy file: the strict defaults, whatever the job says
    sim = BankConfig.from_node_config({"partition-id": 0, "num-partitions": 64}, job)
    assert sim.torch_threads == 1  # simulated banks share the host
    with pytest.raises(
        ConfigError, match="bank policy defaults of b: 'epsilon' expected a finite number > 0, got -1.0"
    ):
        BankConfig.from_node_config({"bank-id": "b", "epsilon": -1}, job)
    with pytest.raises(ConfigError, match="node config of b: 'delta' expected a number, got 'tiny'"):
        BankConfig.from_node_config({"bank-id": "b", "delta": "tiny"}, job)


def test_node_config_rejects_bad_delta_and_counts(tmp_path):
    job = JobConfig(key_dir=str(tmp_path / "keys"))
    with pytest.raises(ConfigError, match=r"'max-delta' expected a number in \(0, 1\), got 0.0"):
        BankConfig.from_node_config({"bank-id": "b", "delta": 0}, job)
    with pytest.raises(ConfigError, match=r"node-config 'delta' = 2 loosens .*'node-config-tightens-only'"):
        BankConfig.from_node_config({"bank-id": "b", "delta": 2}, job)  # issue 26: node-config only tightens
    with pytest.raises(ConfigError, match="'planned-rounds'/'torch-threads' expected >= 0, got -1/0"):
        BankConfig.from_node_config({"bank-id": "b", "planned-rounds": -1}, job)


@pytest.mark.parametrize(
    "key,value,match",
    [  # typos and wrong types never pass silently (issue: epsilom=0.5 trained on the job's budget)
        ("epsilom", 0.5, r"unknown key 'epsilom'; did you mean 'epsilon'\?"),
        ("data_path", "x.jsonl", r"unknown key 'data_path'; did you mean 'data-path'\?"),
        ("planned-rounds", 1.5, r"'planned-rounds' expected an integer, got 1.5"),
        ("planned-rounds", "1.5", r"'planned-rounds' expected an integer, got '1.5'"),
        ("torch-threads", True, r"'torch-threads' expected an integer, got True"),
    ],
)
def test_node_config_is_strict(tmp_path, key, value, match):
    job = JobConfig(key_dir=str(tmp_path / "keys"))
    with pytest.raises(ConfigError, match=match):
        BankConfig.from_node_config({"bank-id": "b", key: value}, job)


def test_policy_file_errors_name_file_key_expected_and_got(tmp_path):
    path = tmp_path / "policy.toml"
    for text, match in (
        ("epsilom = 1.0\n", r"policy.toml: unknown key 'epsilom' \(did you mean 'epsilon'\?\)"),
        ('epsilon = "8"\n', r"policy.toml: 'epsilon' expected a number, got '8'"),
        ("max-delta = 1.5\n", r"policy.toml: 'max-delta' expected a number in \(0, 1\), got 1.5"),
        ('privacy-unit = "household"\n', r"'privacy-unit' expected 'record' or 'customer', got 'household'"),
        ("clip-norm-min = 5.0\nclip-norm-max = 1.0\n", r"'clip-norm-min/clip-norm-max' expected 0 < min <= max"),
        ('release-metrics = ["gradients"]\n', r"'release-metrics' expected a subset of"),
        ("allow-no-dp = 1\n", r"'allow-no-dp' expected true/false, got 1"),
        ("epsilon = [\n", r"policy.toml: not valid TOML"),
    ):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=match):
            BankPolicy.from_file(path)
    with pytest.raises(ConfigError, match="file not found"):
        BankPolicy.from_file(tmp_path / "missing.toml")
    # the example states every default (privacy-unit empty: customer-level on data with a customer_id
    # column, issue 26; eval losses only for the consortium's signed aggregate)
    example = BankPolicy.from_file(ROOT / "deploy" / "bank-policy.example.toml")
    assert example == BankPolicy() and BankPolicy().privacy_unit == "" and example.eval_only_known_models
