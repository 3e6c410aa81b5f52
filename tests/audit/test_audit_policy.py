"""The audit checks every entry against the bank's policy file and sums epsilon per dataset identity.

Issue 26: a ledger signed with the bank's pinned key, with sigma below the policy's floor, clip 100
against a maximum of 10 and epsilon 70.8 against a budget of 3, passed with 0 errors; node-config
`epsilon = 20` over a policy of 3 passed; four ledgers of one dataset audited together passed.
Each case is planted here, and each must fail with a finding naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmoe.audit import audit_ledgers
from fedmoe.audit.__main__ import main
from fedmoe.crypto.identity import ConsortiumPins, generate_identity, write_pins
from fedmoe.fl_client.dp import AccountantState, DPConfig, HistoryEntry, RoundPrivacyReport
from fedmoe.fl_client.ledger import round_entry
from fedmoe.fl_client.policy import BankPolicy
from fedmoe.protocol.ledger import Ledger

N, BATCH = 48, 6
POLICY = "epsilon = 3.0\nmin-noise-multiplier = 0.3\nclip-norm-max = 10.0\n"
FINGERPRINT = "ab" * 32


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    root = tmp_path_factory.mktemp("id")
    bank = generate_identity(root / "bank-0.secret", "bank-0")
    return bank, write_pins(root / "pins.json", ConsortiumPins.from_identities([bank]))


@pytest.fixture
def policy_file(tmp_path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    return path


def report_for(cfg: DPConfig, state: AccountantState, sigma: float) -> RoundPrivacyReport:
    planned = HistoryEntry(sigma, BATCH / N, cfg.local_steps)
    after = state.appended(planned)
    before, total = state.epsilon(), after.epsilon()
    return RoundPrivacyReport(
        bank_id=cfg.bank_id, epsilon_spent_this_round=total - before, epsilon_total=total, epsilon_before=before,
        delta=cfg.delta, accountant=cfg.accountant, sigma=sigma, q=planned.sample_rate, steps=planned.steps,
        history=after.history, accountant_state=after, target_epsilon=cfg.target_epsilon, n_samples=N,
        clip_norm=cfg.clip_norm, mean_loss=0.0, empty_batches=0, grad_sample_mode=cfg.grad_sample_mode,
    )  # fmt: skip


def plant(
    path: Path, identity, *, sigma=1.5, clip=1.0, budget=3.0, overrides=None, job="job", policy_hash=None, released=()
):
    """One signed bank ledger with one trained round, as the bank's own writer makes it."""
    bank, _ = identity
    cfg = DPConfig(target_epsilon=budget, delta=1e-5, clip_norm=clip, planned_rounds=1, local_steps=2,
                   expected_batch_size=BATCH, physical_batch_size=BATCH, bank_id="bank-0", lr=1e-2)  # fmt: skip
    report = report_for(cfg, AccountantState.fresh(cfg), sigma)
    entry = round_entry(
        job_id=job, bank_id="bank-0", round=1, status="trained", report=report, cfg=cfg, n_samples=N,
        budget_epsilon=budget, dataset_fingerprint=FINGERPRINT, dataset_id="cards",
        policy_hash=policy_hash or BankPolicy.from_mapping({}, source="x").content_hash(),
        policy_overrides=overrides, released_metrics=released,
    )  # fmt: skip
    Ledger(path).append(entry, signer=(bank.public_key.hex(), bank.sign))
    return path


def audit(paths, identity, policy_file):
    return audit_ledgers(paths, pins=ConsortiumPins.from_identities([identity[0]]), policies={"bank-0": policy_file})


def test_an_honest_entry_passes_against_its_policy(tmp_path, identity, policy_file):
    good = plant(tmp_path / "l.jsonl", identity, policy_hash=BankPolicy.from_file(policy_file).content_hash())
    result = audit([good], identity, policy_file)
    assert result.ok, [str(f) for f in result.errors]


@pytest.mark.parametrize(
    "plant_kwargs,check,text",
    [
        ({"sigma": 0.1}, "policy-noise", "'noise_multiplier' = 0.1 is below the policy's 'min-noise-multiplier' = 0.3"),
        ({"clip": 100.0}, "policy-clip", "'clip_norm' = 100 is outside the policy's [0.001, 10]"),
        ({"sigma": 0.2, "budget": 80.0}, "policy-budget", "'budget_epsilon' = 80 is above the policy's lifetime"),
        ({"overrides": {"epsilon": 20.0}, "budget": 20.0}, "policy-overrides", "node-config 'epsilon' = 20 loosens"),
        ({"released": ["eval-loss"]}, "policy-releases", "field 'released_metrics' has ['eval-loss'], which the"),
    ],
)
def test_a_planted_violation_of_the_policy_fails_the_audit_naming_it(
    tmp_path, identity, policy_file, plant_kwargs, check, text
):
    policy_hash = BankPolicy.from_file(policy_file).content_hash()
    path = plant(tmp_path / "l.jsonl", identity, policy_hash=policy_hash, **plant_kwargs)
    result = audit([path], identity, policy_file)
    found = [f for f in result.errors if f.check == check]
    assert not result.ok and found and text in found[0].message, [str(f) for f in result.errors]


def test_an_edited_or_missing_policy_file_is_a_finding(tmp_path, identity, policy_file):
    path = plant(tmp_path / "l.jsonl", identity, policy_hash=BankPolicy.from_file(policy_file).content_hash())
    policy_file.write_text(POLICY.replace("3.0", "30.0"), encoding="utf-8")
    assert [f.check for f in audit([path], identity, policy_file).errors] == ["policy-hash"]
    missing = audit([path], identity, tmp_path / "nope.toml")
    assert [f.check for f in missing.errors] == ["policy-file"] and "file not found" in missing.errors[0].message


def test_four_ledgers_of_one_dataset_fail_with_their_composed_epsilon(tmp_path, identity, policy_file):
    policy_hash = BankPolicy.from_file(policy_file).content_hash()
    paths = [plant(tmp_path / f"l{i}" / "ledger.jsonl", identity, sigma=0.9, job=f"job-{i}", policy_hash=policy_hash)
             for i in range(4)]  # fmt: skip
    each = Ledger(paths[0]).entries()[-1]["epsilon"]
    assert each < 3.0  # every ledger on its own is within the budget
    result = audit(paths, identity, policy_file)
    [finding] = [f for f in result.errors if f.check == "dataset-identity"]
    assert "has 4 ledgers of one dataset identity" in finding.message and "above the budget 3" in finding.message
    assert all(str(p) in finding.message for p in paths)


def test_the_cli_takes_a_policy_per_bank(tmp_path, identity, policy_file):
    _, pins = identity
    path = plant(tmp_path / "l.jsonl", identity, clip=100.0,
                 policy_hash=BankPolicy.from_file(policy_file).content_hash())  # fmt: skip
    args = ["--pins", str(pins), "--out", str(tmp_path / "out"), str(path)]
    assert main(args) == 0  # without the policy nothing is wrong with it
    assert main(["--policy", f"bank-0={policy_file}", *args]) == 1


def test_the_empirical_audit_takes_the_ledgers_own_claim(tmp_path, identity, capsys):
    """Issue 26: the canary audit tested its own --epsilon on its own calibration, not the ledger's claim."""
    from fedmoe.audit.canary import claim_from_ledgers

    path = plant(tmp_path / "l.jsonl", identity, sigma=0.3)  # sigma 0.3: its true epsilon is large
    entry = Ledger(path).entries()[0]
    claim = claim_from_ledgers([path])
    assert claim["noise_multiplier"] == 0.3 and claim["target_epsilon"] == entry["epsilon"]
    assert (claim["sample_rate"], claim["steps"]) == (BATCH / N, 2)
    code = main(["--empirical", "--no-pins", "--canaries", "400", "--out", str(tmp_path / "out"), str(path)])
    printed = capsys.readouterr().out
    assert "empirical audit of the claim of" in printed and "sigma=0.3" in printed
    assert code == 1 and "PASS:" not in printed  # never a pass without power


def test_a_round_over_budget_only_under_replace_one_fails_the_audit(tmp_path, identity, policy_file):
    """sigma depends on n, so the budget must hold with n public too (issue 26, item 2): sigma 0.86 at
    q = 6/48 over 2 steps spends 2.98 <= 3 by add/remove and 3.21 > 3 by replace-one."""
    path = plant(tmp_path / "l.jsonl", identity, sigma=0.86, budget=3.0)
    result = audit_ledgers([path], pins=ConsortiumPins.from_identities([identity[0]]))
    found = [f for f in result.errors if f.check == "budget"]
    assert found and "replace-one" in found[0].message, [str(f) for f in result.errors]
    assert not [f for f in result.errors if f.check == "epsilon"]  # the recorded values are the true ones


def test_the_cli_reads_every_banks_policy_from_the_bundles_policy_folder(tmp_path, identity, policy_file):
    """The officer untars every bank's bundle into one folder: policy/<bank>.toml is each bank's
    policy, no `--policy` per bank by hand (issue 31's leftover). An explicit --policy still wins."""
    _, pins = identity
    policy_hash = BankPolicy.from_file(policy_file).content_hash()
    bundles = tmp_path / "audit-in" / "policy"
    bundles.mkdir(parents=True)
    (bundles / "bank-0.toml").write_bytes(policy_file.read_bytes())
    out = ["--pins", str(pins), "--out", str(tmp_path / "out")]
    good = plant(tmp_path / "good.jsonl", identity, policy_hash=policy_hash)
    bad = plant(tmp_path / "bad.jsonl", identity, clip=100.0, policy_hash=policy_hash)
    assert main([*out, str(bad)]) == 0  # without a policy nothing is wrong with it
    assert main(["--policy-dir", str(bundles), *out, str(bad)]) == 1  # clip 100 against the policy's 10
    assert main(["--policy-dir", str(bundles), *out, str(good)]) == 0
    other = tmp_path / "other.toml"
    other.write_text(POLICY.replace("3.0", "30.0"), encoding="utf-8")
    assert main(["--policy-dir", str(bundles), "--policy", f"bank-0={other}", *out, str(good)]) == 1  # its hash
    with pytest.raises(SystemExit):
        main(["--policy-dir", str(tmp_path / "none"), *out, str(good)])
