"""The private round as a bank runs it: budget refusal, accountant state, data and config checks."""

from __future__ import annotations

import json

import pytest
import torch
from test_dp_helpers import packed, single_thread, tiny_model  # noqa: F401  (single_thread: autouse fixture)

from fedmoe.fl_client.dp import (
    AccountantState,
    BudgetExceeded,
    DPConfig,
    DPError,
    HistoryEntry,
    epsilon_for_history,
    train_private_round,
)
from fedmoe.model.deepseek import Router
from fedmoe.model.trainable import TrainableView
from fedmoe.protocol.accounting import epsilon_replace_one

N, L = 48, 8


def config(**overrides) -> DPConfig:
    """A small bank config; RDP (calibrates in ~0.2 s, PRV in ~1.5 s) unless a test is about PRV."""
    fields = dict(
        accountant="rdp",
        target_epsilon=1.0,
        delta=1e-5,
        clip_norm=1.0,
        planned_rounds=2,
        local_steps=2,
        expected_batch_size=6,
        physical_batch_size=4,
        bank_id="bank-a",
        lr=1e-2,
    )
    fields.update(overrides)
    return DPConfig(**fields)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"{n}#load": r.expert_load.clone() for n, r in model.named_modules() if isinstance(r, Router)})
    return state


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_bank_with_epsilon_1_refuses_the_round_past_its_budget():
    model = tiny_model("lora", dtype=torch.float32)
    data = packed(N, L)
    cfg = config(accountant="prv")
    state = AccountantState.fresh(cfg)
    reports = []
    for round_ in range(2):  # the planned rounds fit
        report = train_private_round(model, data, cfg, state, seed=round_)
        assert report.epsilon_before == pytest.approx(state.epsilon())
        state = report.accountant_state
        reports.append(report)
    assert reports[0].epsilon_spent_this_round > reports[1].epsilon_spent_this_round > 0  # sub-additive
    # the plan spends the budget under the larger of the two adjacencies (replace-one: sigma depends on n)
    assert 0.98 <= max(reports[-1].epsilon_total, epsilon_replace_one(reports[-1].history, delta=1e-5)) <= 1.0
    assert reports[-1].history == (HistoryEntry(reports[0].sigma, 6 / N, 2),) * 2
    # Re-verifiable from the plain history alone:
    assert epsilon_for_history(reports[-1].history, delta=1e-5, mechanism="prv") == reports[-1].epsilon_total

    before_model, before_state = snapshot(model), state.to_json()
    with pytest.raises(
        BudgetExceeded,
        match=r"bank 'bank-a'.*would bring epsilon to \d\.\d+ \(replace-one \d\.\d+\); budget target_epsilon=1\.0",
    ):
        train_private_round(model, data, cfg, state, seed=2)
    assert_same(before_model, snapshot(model))
    assert state.to_json() == before_state


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost", "mixed"])
def test_round_trains_only_the_trainable_view_and_leaves_routing_state_alone(grad_sample_mode):
    model = tiny_model("router+experts", dtype=torch.float32)
    view = TrainableView(model)
    trained_before = view.flatten()
    frozen_before = {k: v for k, v in snapshot(model).items() if k not in view.params}
    cfg = config(
        target_epsilon=8.0,
        planned_rounds=1,
        expected_batch_size=8,
        physical_batch_size=3,
        grad_sample_mode=grad_sample_mode,
    )
    report = train_private_round(model, packed(N, L), cfg, AccountantState.fresh(cfg), seed=0)
    assert not torch.equal(view.flatten(), trained_before)
    frozen_after = {k: v for k, v in snapshot(model).items() if k not in view.params}
    assert_same(frozen_before, frozen_after)  # incl. e_score_correction_bias and expert_load
    assert report.steps == 2 and report.q == 8 / N and report.mean_loss > 0
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())


def test_same_seed_same_round_and_empty_batches_take_noise_steps():
    cfg = config(target_epsilon=5.0, planned_rounds=1, local_steps=6, expected_batch_size=1, physical_batch_size=1)
    views = []
    for _ in range(2):
        model = tiny_model("lora", dtype=torch.float32)
        report = train_private_round(model, packed(N, L), cfg, AccountantState.fresh(cfg), seed=11)
        views.append(TrainableView(model).flatten())
    assert report.empty_batches > 0  # q = 1/48: some Poisson batches are empty, still a step each
    assert report.steps == 6
    assert torch.equal(views[0], views[1])


def test_secure_mode_trains_and_takes_no_seed():
    cfg = config(target_epsilon=5.0, planned_rounds=1, local_steps=1, secure_mode=True)
    model = tiny_model("lora", dtype=torch.float32)
    with pytest.raises(DPError, match="secure_mode.*expected seed=None, got 3"):
        train_private_round(model, packed(N, L), cfg, AccountantState.fresh(cfg), seed=3)
    before = TrainableView(model).flatten()
    train_private_round(model, packed(N, L), cfg, AccountantState.fresh(cfg), seed=None)
    assert not torch.equal(before, TrainableView(model).flatten())


def test_accountant_state_round_trips_through_json(tmp_path):
    cfg = config(accountant="rdp")
    state = AccountantState.fresh(cfg).appended(HistoryEntry(0.87654321, 0.125, 7)).appended(HistoryEntry(1.5, 0.1, 3))
    again = AccountantState.from_json(state.to_json())
    assert again == state and again.epsilon() == state.epsilon()
    path = state.save(tmp_path / "bank-a" / "accountant.json")
    assert AccountantState.load(path) == state
    assert json.loads(path.read_text())["history"] == [[0.87654321, 0.125, 7], [1.5, 0.1, 3]]


def test_memoized_epsilon_answers_only_for_the_same_history_delta_and_adjacency():
    """A bank asks about one history several times a round (pre-flight, budget check, ledger entry):
    the memo answers a repeat with the value a fresh computation gives, never another key's value."""
    from fedmoe.fl_client.dp.accountant import _memo_epsilon, _memo_replace_one

    one = (HistoryEntry(1.0, 0.01, 40),)
    states = [
        AccountantState("rdp", 1e-5, one),
        AccountantState("rdp", 1e-6, one),
        AccountantState("rdp", 1e-5, one + one),
        AccountantState("prv", 1e-5, one),
    ]
    fresh = [epsilon_for_history(s.history, delta=s.delta, mechanism=s.mechanism) for s in states]
    fresh += [epsilon_replace_one(s.history, delta=s.delta) for s in states[:3]]
    assert len(set(fresh)) == len(fresh)  # each key its own value
    _memo_epsilon.cache_clear()
    _memo_replace_one.cache_clear()

    def memo() -> list[float]:
        return [s.epsilon() for s in states] + [s.epsilon_replace_one() for s in states[:3]]

    assert memo() == fresh and memo() == fresh
    assert _memo_epsilon.cache_info().hits == 4 and _memo_replace_one.cache_info().hits == 3  # the repeat
    assert states[0].epsilon_after(one[0]) == (fresh[2], fresh[6])  # the budget's two epsilons after a round


@pytest.mark.parametrize(
    "raw,message",
    [
        ('{"version": 2, "mechanism": "prv", "delta": 1e-5, "history": []}', "version expected 1, got 2"),
        ('{"version": 1, "mechanism": "gdp", "delta": 1e-5, "history": []}', "mechanism: expected one of"),
        ('{"version": 1, "mechanism": "prv", "delta": 1e-5}', "missing field 'history'"),
        ('{"version": 1, "mechanism": "prv", "delta": 1e-5, "history": [[1.0, 0.1]]}', r"history\[0\] expected"),
        ('{"version": 1, "mechanism": "prv", "delta": 1e-5, "history": [[1.0, 2.0, 3]]}', r"0 < q <= 1"),
        ("{not json", "invalid JSON at line 1"),
    ],
)
def test_bad_accountant_state_is_a_dp_error(raw, message):
    with pytest.raises(DPError, match=message):
        AccountantState.from_json(raw, source="banks/a/accountant.json")


def test_state_from_another_delta_or_accountant_is_refused():
    model = tiny_model("lora", dtype=torch.float32)
    cfg = config()
    with pytest.raises(DPError, match="accountant state has delta=1e-06, the DP config says 1e-05"):
        train_private_round(model, packed(N, L), cfg, AccountantState("rdp", 1e-6), seed=0)
    with pytest.raises(DPError, match="accountant state has accountant='prv', the DP config says 'rdp'"):
        train_private_round(model, packed(N, L), cfg, AccountantState("prv", 1e-5), seed=0)


def test_data_must_hold_one_privacy_unit_per_sample():
    model = tiny_model("lora", dtype=torch.float32)
    cfg = config(privacy_unit="customer")
    data = packed(N, L)
    data.unit_ids[5] = data.unit_ids[4]
    with pytest.raises(DPError, match=r"privacy unit 'record-4' spans several samples.*one sample per customer"):
        train_private_round(model, data, cfg, AccountantState.fresh(cfg), seed=0)
    data = packed(N, L)
    data.record_indices[3] = [3, 4]
    with pytest.raises(DPError, match="sample 3 holds 2.*mode='per_record'"):
        train_private_round(model, data, config(), AccountantState.fresh(config()), seed=0)
    with pytest.raises(
        DPError, match=r"expected_batch_size=6 needs at least that many samples \(record units\), got 4"
    ):
        train_private_round(model, packed(4, L), config(), AccountantState.fresh(config()), seed=0)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("target_epsilon", 0.0, r"DPConfig\.target_epsilon \(bank 'bank-a'\): expected a finite number > 0, got 0\.0"),
        ("delta", 1.5, r"DPConfig\.delta \(bank 'bank-a'\): expected a number in \(0, 1\), got 1\.5"),
        ("accountant", "gdp", r"DPConfig\.accountant .*expected one of \['prv', 'rdp'\], got 'gdp'"),
        ("grad_sample_mode", "ew", r"expected one of \['hooks', 'ghost', 'mixed'\]"),
        ("privacy_unit", "household", r"expected one of \['record', 'customer'\]"),
        ("local_steps", 0, r"DPConfig\.local_steps .*expected an integer >= 1, got 0"),
    ],
)
def test_config_errors_name_bank_field_expected_and_got(field, value, message):
    with pytest.raises(DPError, match=message):
        config(**{field: value})


def test_packed_data_from_fl_client_data_is_accepted():
    data_mod = pytest.importorskip("fedmoe.fl_client.data")
    records = [{"text": f"payment {i} to merchant {i % 7}", "customer_id": f"c{i % 10}"} for i in range(40)]

    def encode(text: str) -> list[int]:
        return [b % 300 + 1 for b in text.encode()]

    pack = dict(encode=encode, seq_len=L, eos_id=0, pad_id=0)
    per_customer = data_mod.pack_records(records, privacy_unit="customer", **pack)
    cfg = config(target_epsilon=5.0, planned_rounds=1, local_steps=1, privacy_unit="customer", expected_batch_size=4)
    report = train_private_round(
        tiny_model("lora", dtype=torch.float32), per_customer, cfg, AccountantState.fresh(cfg), seed=0
    )
    assert report.n_samples == 10
    concat = data_mod.pack_records(records, privacy_unit="record", mode="concat", **{**pack, "seq_len": 64})
    assert any(len(m) > 1 for m in concat.record_indices)
    with pytest.raises(DPError, match="one record per sample"):
        train_private_round(
            tiny_model("lora", dtype=torch.float32), concat, config(), AccountantState.fresh(config()), seed=0
        )


def test_the_accountant_calibrates_the_batch_sizing_and_a_larger_batch_buys_less_noise():
    """The same epsilon and steps: sigma grows with the expected batch, the noise per coordinate falls."""
    from fedmoe.fl_client.dp.accountant import CALIBRATION_TOLERANCE, plan_for

    plans = [plan_for(config(target_epsilon=8.0, planned_rounds=40, local_steps=1, expected_batch_size=b), 400)
             for b in (16, 48)]  # fmt: skip
    small, large = plans
    assert (small.expected_batch, small.steps, small.sample_rate) == (16, 40, 16 / 400)
    # replace-one binds at the larger q (sigma 0.98 instead of 0.87), so the batch buys less than half
    assert small.sigma < large.sigma and large.noise_per_coordinate < 0.6 * small.noise_per_coordinate
    for plan in plans:  # the larger of the two adjacencies spends the budget (replace-one: sigma depends on n)
        assert 8.0 - CALIBRATION_TOLERANCE <= max(plan.epsilon, plan.epsilon_replace_one) <= 8.0
        assert plan.noise_per_coordinate == pytest.approx(plan.sigma / plan.expected_batch)
    with pytest.raises(DPError, match="expected_batch_size=500 needs at least that many"):
        plan_for(config(expected_batch_size=500), 400)


def test_a_round_within_budget_by_add_remove_but_not_by_replace_one_is_refused():
    """Opacus' sigma alone (add/remove) is not enough: sigma depends on n, so replace-one counts (issue 26)."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedmoe.fl_client.dp.accountant import check_budget

    cfg = config(target_epsilon=8.0, planned_rounds=20, local_steps=1, expected_batch_size=32, accountant="prv")
    q = 32 / 400
    add_remove_sigma = get_noise_multiplier(
        target_epsilon=8.0, target_delta=cfg.delta, sample_rate=q, steps=20, accountant="prv", epsilon_tolerance=0.01
    )
    state = AccountantState(mechanism="prv", delta=cfg.delta, history=(HistoryEntry(add_remove_sigma, q, 19),))
    with pytest.raises(BudgetExceeded, match="replace-one"):
        check_budget(cfg, state, HistoryEntry(add_remove_sigma, q, 1))
