"""A bank's own privacy policy: what any job may ask of this bank's data, decided by the bank.

The job's run config is written by whoever submits the job (the server's operator). Every
privacy setting in it is only a *request*: the bank checks it against this policy and refuses a
job that asks for weaker privacy than the policy allows, naming the key, the job's value and the
policy's bound. The server can therefore not turn DP off, raise epsilon or delta, weaken the
privacy unit, or ask for predictable (seeded) noise.

The policy lives in a TOML file the bank's node-config points to (`policy-file`); without one,
the defaults below hold (the strict ones). Example: deploy/bank-policy.example.toml.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedmoe.crypto.secagg.params import BANK_FLOOR
from fedmoe.protocol.config import PRIVACY_UNITS, JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.files import read_document
from fedmoe.protocol.ledger import canonical_json

# Metrics a policy may let leave the bank. None of them is DP-protected: off by default.
RELEASABLE_METRICS: tuple[str, ...] = ("train-loss", "eval-loss")
# Privacy units from weakest to strongest: protecting a whole customer covers each of its records.
UNIT_STRENGTH = {unit: rank for rank, unit in enumerate(PRIVACY_UNITS)}
# Node-config keys that may override the policy file, and the policy field each tightens.
NODE_OVERRIDES = {"epsilon": "epsilon", "delta": "max_delta"}
# Fields that describe where a policy came from, not what it allows (left out of its hash).
_META_FIELDS = ("source", "overrides", "file_hash")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BankPolicy:
    """The bank's rules; every field has a strict default.

    Attributes:
        epsilon: lifetime budget for this dataset, over every job that ever trains on it.
        max_delta: the largest delta a job may use; the bank also refuses delta > 1/n.
        min_noise_multiplier: rounds calibrated below this sigma are refused.
        privacy_unit: the weakest privacy unit the bank accepts ("record" < "customer"). Empty (the
            default): "customer" when the bank's data file has a `customer_id` column, else "record"
            (the synthetic corpus of tests and demos has no real customers and keeps the job's unit); a
            bank that wants record-level DP on customer data says `privacy-unit = "record"`, and
            every ledger entry then shows it (`customer_ids: true` with unit "record").
        clip_norm_min, clip_norm_max: accepted range of the job's clip norm.
        allow_no_dp: whether a job may train without DP at all (never by default).
        seeded_noise: reproducible-experiment mode: sampling and noise seeded from job values,
            which anyone holding the update can reproduce (epsilon = infinity in practice). Logged
            loudly, recorded in every ledger entry, and a failing finding of the audit.
        release_metrics: plain metrics the bank may send to the server (not DP-protected).
        min_banks: the fewest banks whose updates a secure aggregate holding this bank's update may
            hold (>= 3: with two, the aggregate minus one's own update is the other's). The bank
            enforces it itself: it refuses a round setup with fewer participants, an unmask view with
            fewer survivors and an aggregate with fewer signed contributors, whatever the job's
            `min-banks` says (docs/secagg.md).
        colluding_banks: how many banks colluding with the server secure aggregation must resist
            (>= 1): the bank refuses a setup whose threshold is below min_secure_threshold(holders,
            this) and a consent quorum is sized for it (docs/secagg.md, "Release rules", A3).
        reveal_on_quarantine: whether, after the banks quarantined a secure aggregate as out of bound,
            this bank reveals that round's mask secret key so the poisoner can be named (only after it
            recomputed the sum from the signed evidence and its own check rejected it; never for a
            round it applied; docs/secagg.md "Accountable rounds"). Revealing makes that round's
            individual updates readable to every holder of the BFV key (each DP-protected, its
            epsilon already spent). False by default.
        max_reveals: the most rounds per job this bank reveals (a colluding bank poisoning on
            purpose buys at most this many).
        allow_shared_key_aggregation: whether this bank trains in jobs with `aggregation = "ckks"`,
            where every bank holds the one CKKS secret key, so the server plus any one bank can read
            this bank's update (the floor above is then no protection either). True by default (one
            institution federating its own silos); a consortium's banks set it false
            (deploy/bank-policy.example.toml).
        dataset_id: the bank's own name for this dataset; its ledger lives under privacy/<dataset-id>/ and
            every version of the data (rows added, reordered) spends from that one lifetime budget. Empty:
            the ledger is found by the records themselves (the one that holds any of them), else named by
            the dataset's fingerprint.
        eval_only_known_models: release an eval loss only for the consortium's signed aggregate (a secure
            aggregation job after its first applied round), never for a model the server could have
            chosen (a CKKS aggregate, the job's starting checkpoint).
        keep_plaintext_deltas: debug/test only: the bank keeps its own plaintext update of every round
            on its disk (deltas/, never sent). Only the bank's policy can ask for that, never a job: a
            server that could switch it on would make every bank write its updates in the clear (issue 27).
        source: where the policy came from (file path or "defaults"), for messages.
        overrides: node-config values applied over the file (each only tightens it), for the ledger.
        file_hash: content hash of the policy before `overrides` (what `fedmoe audit --policy` checks).
    """

    epsilon: float = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.3
    privacy_unit: str = ""
    clip_norm_min: float = 1e-3
    clip_norm_max: float = 10.0
    allow_no_dp: bool = False
    seeded_noise: bool = False
    release_metrics: tuple[str, ...] = ()
    min_banks: int = BANK_FLOOR
    colluding_banks: int = 1
    reveal_on_quarantine: bool = False
    max_reveals: int = 1
    allow_shared_key_aggregation: bool = True
    dataset_id: str = ""
    eval_only_known_models: bool = True  # never an eval loss of a model the server could have chosen (issue 26)
    keep_plaintext_deltas: bool = False  # debug/test only, and only by the bank's own policy (issue 27)
    source: str = field(default="defaults", compare=False)
    overrides: tuple[tuple[str, float], ...] = field(default=(), compare=False)
    file_hash: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, got: Any) -> ConfigError:
            return ConfigError(f"bank policy {self.source}: '{key}' expected {expected}, got {got!r}")

        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise bad("epsilon", "a finite number > 0", self.epsilon)
        if not 0 < self.max_delta < 1:
            raise bad("max-delta", "a number in (0, 1)", self.max_delta)
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise bad("min-noise-multiplier", "a finite number >= 0", self.min_noise_multiplier)
        if self.privacy_unit not in ("", *PRIVACY_UNITS):
            raise bad("privacy-unit", " or ".join(map(repr, PRIVACY_UNITS)), self.privacy_unit)
        if not 0 < self.clip_norm_min <= self.clip_norm_max < math.inf:
            raise bad("clip-norm-min/clip-norm-max", "0 < min <= max < inf", (self.clip_norm_min, self.clip_norm_max))
        if not isinstance(self.min_banks, int) or isinstance(self.min_banks, bool) or self.min_banks < BANK_FLOOR:
            raise bad(
                "min-banks",
                f"an integer >= {BANK_FLOOR} (with two banks each reads the other's update)",
                self.min_banks,
            )
        if (
            not isinstance(self.colluding_banks, int)
            or isinstance(self.colluding_banks, bool)
            or self.colluding_banks < 1
        ):
            raise bad("colluding-banks", "an integer >= 1", self.colluding_banks)
        if not isinstance(self.max_reveals, int) or isinstance(self.max_reveals, bool) or self.max_reveals < 0:
            raise bad("max-reveals", "an integer >= 0", self.max_reveals)
        unknown = sorted(set(self.release_metrics) - set(RELEASABLE_METRICS))
        if unknown:
            raise bad("release-metrics", f"a subset of {list(RELEASABLE_METRICS)}", unknown)
        if self.dataset_id and not _DATASET_ID.match(self.dataset_id):
            raise bad("dataset-id", "letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)",
                      self.dataset_id)  # fmt: skip
        if not self.file_hash:
            object.__setattr__(self, "file_hash", self.content_hash())

    def unit_for(self, *, has_customer_id: bool) -> str:
        """The weakest unit this bank trains at for its data: customer-level when it has customer ids,
        unless the policy says `privacy-unit = "record"` explicitly."""
        return self.privacy_unit or ("customer" if has_customer_id else "record")

    def content_hash(self) -> str:
        """SHA-256 of the rules (every field but the provenance ones), canonical JSON: comments and key
        order in the file do not change it; any rule does."""
        body = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name not in _META_FIELDS}
        return hashlib.sha256(canonical_json(body).encode()).hexdigest()

    def tightened(self, **node: float) -> BankPolicy:
        """The policy with node-config `epsilon` / `delta` applied: each may only tighten the file.

        Raises:
            ConfigError: a node-config value looser than the policy's (rule 'node-config-tightens-only').
        """
        changes: dict[str, float] = {}
        for key, value in sorted(node.items()):
            name = NODE_OVERRIDES[key]
            if value > getattr(self, name):
                raise ConfigError(
                    f"node-config '{key}' = {value:g} loosens bank policy {self.source} "
                    f"('{name.replace('_', '-')}' = {getattr(self, name):g}): node-config may only tighten the "
                    "policy (rule 'node-config-tightens-only')"
                )
            changes[name] = float(value)
        if not changes:
            return self
        overrides = tuple((k, float(v)) for k, v in sorted(node.items()))
        return replace(self, **changes, overrides=overrides, file_hash=self.file_hash)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> BankPolicy:
        """Reads a TOML policy; unknown keys, wrong types and inconsistent bounds name the file and key."""
        missing = "file not found (node-config 'policy-file')"
        raw = read_document(path, ConfigError, fmt="toml", where=f"bank policy {path}", missing=missing)
        return cls.from_mapping(raw, source=str(path), **overrides)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, source: str, **overrides: Any) -> BankPolicy:
        known = {f.name.replace("_", "-"): f for f in fields(cls) if f.name not in _META_FIELDS}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"bank policy {source}: unknown key {key!r}{hint}; known: {sorted(known)}")
            kwargs[known[key].name] = _typed(source, key, value, known[key].default)
        return cls(**{**kwargs, **overrides}, source=source)


def _typed(source: str, key: str, value: Any, default: Any) -> Any:
    expected = {bool: "true/false", int: "an integer", float: "a number", str: "a string", tuple: "a list of strings"}[
        type(default)
    ]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[type(default)]
    if not ok:
        raise ConfigError(f"bank policy {source}: '{key}' expected {expected}, got {value!r}")
    return tuple(value) if isinstance(default, tuple) else type(default)(value)


@dataclass(frozen=True)
class Refusal:
    """A job setting (or a bank setting) the bank's policy does not allow: the key, the value, the bound.

    Its text is what the server sees: it names the rule and the policy's limit, never a number
    derived from the bank's dataset (its size, q, 1/n, a calibrated sigma). `detail` may hold those
    for the bank's own log and ledger; it never leaves the bank.
    """

    key: str
    got: Any
    bound: str
    rule: str = ""  # the rule's name (defaults to the key)
    of_policy: bool = False  # the bank's own settings refuse, whatever the job asks
    detail: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.rule or self.key

    def __str__(self) -> str:
        if self.of_policy:
            return f"refused by the bank's own policy (rule '{self.name}'): {self.bound}"
        head = f"run config '{self.key}' = {self.got!r} is refused by the bank's policy"
        return f"{head} (rule '{self.name}'): {self.bound}"


def check_job(job: JobConfig, policy: BankPolicy) -> list[Refusal]:
    """Every job setting that would spend more privacy than the policy allows (empty = accepted)."""
    out: list[Refusal] = []
    if not job.dp and not policy.allow_no_dp:
        out.append(Refusal("dp", job.dp, "this bank never trains without DP ('allow-no-dp' is false)"))
    if job.epsilon > policy.epsilon:
        out.append(Refusal("epsilon", job.epsilon, f"the bank's lifetime budget is epsilon <= {policy.epsilon:g}"))
    if job.delta > policy.max_delta:
        out.append(Refusal("delta", job.delta, f"'max-delta' is {policy.max_delta:g}"))
    if not job.secure_mode and not policy.seeded_noise:
        out.append(
            Refusal("secure-mode", job.secure_mode, "noise must come from the OS CSPRNG ('seeded-noise' is false)")
        )
    if policy.privacy_unit and UNIT_STRENGTH[job.privacy_unit] < UNIT_STRENGTH[policy.privacy_unit]:
        out.append(Refusal("privacy-unit", job.privacy_unit, f"the bank protects at least a {policy.privacy_unit!r}"))
    if job.aggregation != "secagg" and not policy.allow_shared_key_aggregation:
        out.append(
            Refusal(
                "aggregation",
                job.aggregation,
                "this bank trains only under secure aggregation ('allow-shared-key-aggregation' is false): with one "
                "shared key the server plus any bank reads its update",
            )
        )
    if not policy.clip_norm_min <= job.clip_norm <= policy.clip_norm_max:
        bounds = f"[{policy.clip_norm_min:g}, {policy.clip_norm_max:g}]"
        out.append(Refusal("clip-norm", job.clip_norm, f"the policy accepts clip norms in {bounds}"))
    return out


def check_data(policy: BankPolicy, *, n_samples: int) -> list[Refusal]:
    """The policy against the bank's own data: 'max-delta' <= 1/n.

    Compares the *policy's* bound, never the job's delta, with 1/n: the outcome does not depend on
    anything the server sends, so it cannot be used to search for n (issue 26).
    """
    if policy.max_delta > 1.0 / max(n_samples, 1):
        return [
            Refusal(
                "max-delta",
                policy.max_delta,
                f"'max-delta' = {policy.max_delta:g} is too large for this bank's dataset (delta must be below 1/n); "
                "its operator must lower it",
                rule="delta-below-1/n",
                of_policy=True,
                detail=f"1/n = {1.0 / max(n_samples, 1):.3g} ({n_samples} units)",
            )
        ]
    return []


def check_noise(policy: BankPolicy, job: JobConfig, *, noise_multiplier: float) -> list[Refusal]:
    """The calibrated sigma against the policy's floor (the sigma itself stays in the bank's detail)."""
    if noise_multiplier >= policy.min_noise_multiplier:
        return []
    return [
        Refusal(
            "epsilon",
            job.epsilon,
            "the job's budget per round needs less noise than "
            f"'min-noise-multiplier' = {policy.min_noise_multiplier:g}",
            rule="min-noise-multiplier",
            detail=f"calibrated sigma {noise_multiplier:.4f}",
        )
    ]
