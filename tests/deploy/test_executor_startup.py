"""A bank's executor checks its node-config when it starts (issue 31): a bad site stops it with the reason.

Before, a policy typo or a wrong data path was found only when the first job arrived, after the
other banks had trained and spent their budget on a round that then aborted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.fl_client.executor import EXIT_BAD_SITE, startup_check
from fedmoe.fl_server.ceremony import loopback_ceremony

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    key_dir = tmp_path_factory.mktemp("keys")
    loopback_ceremony(key_dir, ["bank-0"])
    return key_dir


def node_config(keys: Path, tmp_path: Path, **extra: str) -> str:
    pairs = {"bank-id": "bank-0", "state-dir": str(tmp_path / "state"), "key-path": str(keys / "context.secret.ckks")}
    pairs.update(extra)
    return " ".join(f"{k}='{v}'" for k, v in pairs.items())


def test_a_good_site_passes(keys, tmp_path):
    data = tmp_path / "records.jsonl"
    data.write_text('{"text": "card payment"}\n')
    policy = tmp_path / "policy.toml"
    policy.write_text("epsilon = 3.0\n")
    assert startup_check(node_config(keys, tmp_path, **{"data-path": str(data), "policy-file": str(policy)})) == []


def test_each_mistake_is_named(keys, tmp_path):
    typo = tmp_path / "policy.toml"
    typo.write_text("epsillon = 3.0\n")
    (problem,) = startup_check(node_config(keys, tmp_path, **{"policy-file": str(typo)}))
    assert "epsillon" in problem and "did you mean 'epsilon'" in problem
    (problem,) = startup_check(node_config(keys, tmp_path, **{"data-path": str(tmp_path / "nope.jsonl")}))
    assert "nope.jsonl: no such file" in problem
    (problem,) = startup_check(node_config(keys, tmp_path, **{"data-pth": "x"}))
    assert "unknown key 'data-pth'" in problem and "data-path" in problem
    (problem,) = startup_check(node_config(tmp_path, tmp_path))
    assert "no secret context" in problem


def test_the_executor_exits_at_start_with_the_reason(keys, tmp_path):
    typo = tmp_path / "policy.toml"
    typo.write_text("epsillon = 3.0\n")
    env = {**os.environ, "FEDMOE_NODE_CONFIG": node_config(keys, tmp_path, **{"policy-file": str(typo)})}
    out = subprocess.run(
        [sys.executable, "-m", "fedmoe.fl_client.executor", "--insecure", "--runtime-api-address", "127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == EXIT_BAD_SITE, out.stderr[-2000:]
    assert "cannot take part in a job" in out.stderr and "epsillon" in out.stderr
