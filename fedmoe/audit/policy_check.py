"""Checking ledgers against the bank's own policy file, and one lifetime budget per dataset identity.

`fedmoe-audit --policy bank-0=FILE` reads the bank's policy; every entry of that bank must carry the
policy's content hash (`policy_hash`, written by the bank from the policy in force) and comply with
it, after the node-config overrides it records (which may only tighten the policy):

    policy-file      the file is missing or does not parse
    policy-hash      the entry was written under another policy (the file was edited, or another one)
    policy-overrides a node-config override loosens the policy (rule 'node-config-tightens-only')
    policy-noise     a trained round's sigma is below 'min-noise-multiplier'
    policy-clip      the clip norm is outside ['clip-norm-min', 'clip-norm-max']
    policy-delta     delta above 'max-delta'
    policy-unit      a privacy unit weaker than 'privacy-unit'
    policy-budget    the budget, or the epsilon a round spent, above the policy's lifetime 'epsilon'
    policy-noise-source  seeded noise without 'seeded-noise'; a round without DP without 'allow-no-dp'
    policy-releases  the entry releases a plain metric the policy's 'release-metrics' does not

Independently of any policy, `dataset-identity` sums epsilon over every ledger of one bank that
covers the same dataset identity (same `dataset_id` or same `dataset_fingerprint`): a dataset has one
lifetime budget, so two ledgers for it are a reset, and their composed epsilon is what was spent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedmoe.fl_client.policy import UNIT_STRENGTH, BankPolicy
from fedmoe.protocol.accounting import epsilon_pld, epsilon_replace_one
from fedmoe.protocol.errors import ConfigError

Add = Callable[..., None]  # _Collector.add(severity, check, where, message, entry)
SPENDING_STATUSES = ("trained", "non-private")  # the entries that spend; every other one carries its epsilon over


def load_policies(policies: Mapping[str, str | os.PathLike[str]] | None, add: Add) -> dict[str, tuple[Path, Any]]:
    """bank id -> (file, BankPolicy or None when it cannot be read: a 'policy-file' finding)."""
    out: dict[str, tuple[Path, Any]] = {}
    for bank, raw in (policies or {}).items():
        path = Path(raw)
        try:
            out[bank] = (path, BankPolicy.from_file(path))
        except ConfigError as err:
            add("error", "policy-file", (path, None), f"bank {bank!r}: policy unreadable: {err}", {"bank_id": bank})
            out[bank] = (path, None)
    return out


def _effective(entry: Mapping[str, Any], where: Any, policy: BankPolicy, path: Path, add: Add) -> BankPolicy | None:
    """The policy in force for `entry`: hash checked, node-config overrides applied (tightening only)."""
    if entry.get("policy_hash") != policy.content_hash():
        recorded = str(entry.get("policy_hash") or "(none)")[:16]
        add("error", "policy-hash", where,
            f"entry written under policy {recorded}..., {path} has {policy.content_hash()[:16]}...: the policy "
            "file was edited since, or is not the one in force. What to do: audit against the bank's policy of "
            "that time", entry)  # fmt: skip
        return None
    overrides = entry.get("policy_overrides") or {}
    try:
        return policy.tightened(**{k: float(v) for k, v in overrides.items()})
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        add("error", "policy-overrides", where, f"node-config overrides {overrides} over {path}: {err}", entry)
        return None


def check_entry_policy(entry: Mapping[str, Any], where: Any, policy: BankPolicy, path: Path, add: Add) -> None:
    """Every rule of the bank's policy against one (well-formed) bank entry."""
    rules = _effective(entry, where, policy, path, add)
    if rules is None:
        rules = policy  # still check the numbers against the file as given
    trained, sigma = entry["status"] == "trained", entry["noise_multiplier"]

    def fail(check: str, message: str) -> None:
        add("error", check, where, f"{message} ({path})", entry)

    if trained and sigma is not None and sigma < rules.min_noise_multiplier:
        fail("policy-noise", f"field 'noise_multiplier' = {sigma:.4g} is below the policy's "
             f"'min-noise-multiplier' = {rules.min_noise_multiplier:g}")  # fmt: skip
    if not rules.clip_norm_min <= entry["clip_norm"] <= rules.clip_norm_max:
        fail("policy-clip", f"field 'clip_norm' = {entry['clip_norm']:g} is outside the policy's "
             f"[{rules.clip_norm_min:g}, {rules.clip_norm_max:g}] ('clip-norm-min', 'clip-norm-max')")  # fmt: skip
    if entry["delta"] > rules.max_delta:
        fail(
            "policy-delta",
            f"field 'delta' = {entry['delta']:g} is above the policy's 'max-delta' = {rules.max_delta:g}",
        )
    unit = rules.unit_for(has_customer_id=bool(entry["customer_ids"]))  # "" = customer on data with customer ids
    if UNIT_STRENGTH.get(entry["privacy_unit"], -1) < UNIT_STRENGTH[unit]:
        fail("policy-unit", f"field 'privacy_unit' = {entry['privacy_unit']!r} is weaker than the policy's "
             f"'privacy-unit' = {unit!r}")  # fmt: skip
    # An entry that spent nothing carries the epsilon of earlier rounds, each checked where it was spent: a
    # refusal after the budget was lowered below it is the bank's check working, not an overspend.
    spent_here = ("epsilon", "epsilon_replace_one") if entry["status"] in SPENDING_STATUSES else ()
    for name in ("budget_epsilon", *spent_here):
        if isinstance(entry.get(name), (int, float)) and entry[name] > rules.epsilon * (1 + 1e-9):
            fail("policy-budget", f"field '{name}' = {entry[name]:.4g} is above the policy's lifetime "
                 f"'epsilon' = {rules.epsilon:g}")  # fmt: skip
    extra = sorted(set(entry.get("released_metrics") or ()) - set(rules.release_metrics))
    if extra:
        fail("policy-releases", f"field 'released_metrics' has {extra}, which the policy's 'release-metrics' = "
             f"{list(rules.release_metrics)} does not release")  # fmt: skip
    if entry["noise_source"] == "seeded" and not rules.seeded_noise:
        fail("policy-noise-source", "seeded noise, but the policy's 'seeded-noise' is false")
    if entry["status"] == "non-private" and not rules.allow_no_dp:
        fail("policy-noise-source", "a round without DP, but the policy's 'allow-no-dp' is false")


def _identity_groups(files: list[tuple[Path, list[dict[str, Any]]]]) -> list[list[int]]:
    """Indices of files that share a bank and a dataset identity (a dataset id or a fingerprint)."""
    parent = list(range(len(files)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[tuple[str, str, str], int] = {}
    for i, (_, entries) in enumerate(files):
        for entry in entries:
            for kind in ("dataset_id", "dataset_fingerprint"):
                value = entry.get(kind)
                if isinstance(value, str) and value:
                    key = (str(entry.get("bank_id")), kind, value)
                    parent[find(i)] = find(seen.setdefault(key, i))
    groups: dict[int, list[int]] = {}
    for i in range(len(files)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def check_dataset_identities(
    files: list[tuple[Path, list[dict[str, Any]]]], policies: Mapping[str, tuple[Path, Any]], add: Add
) -> None:
    """One lifetime budget per dataset identity: several ledgers of one bank for it are a reset."""
    for group in _identity_groups(files):
        lasts = [files[i][1][-1] for i in group]
        bank = str(lasts[0].get("bank_id"))
        policy = policies.get(bank, (None, None))[1]
        delta = policy.max_delta if policy is not None else min(float(e["delta"]) for e in lasts)
        budget = policy.epsilon if policy is not None else min(float(e["budget_epsilon"]) for e in lasts)
        history = [h for e in lasts for h in e["history"]]
        try:
            composed = max(epsilon_pld(history, delta=delta), epsilon_replace_one(history, delta=delta))
        except (ValueError, ArithmeticError, RuntimeError):
            composed = float("inf")
        paths = ", ".join(str(files[i][0]) for i in group)
        verdict = f"above the budget {budget:g}" if composed > budget else f"within the budget {budget:g}"
        add("error", "dataset-identity", (files[group[0]][0], None),
            f"bank {bank!r} has {len(group)} ledgers of one dataset identity ({paths}): a dataset has one lifetime "
            f"budget, so each extra ledger is a reset; their {len(history)} rounds compose to epsilon "
            f"{composed:.4g} at delta {delta:g}, {verdict}. What to do: treat the composed epsilon as spent",
            {"bank_id": bank})  # fmt: skip
