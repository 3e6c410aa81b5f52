"""The bank <-> server message contents and their Flower RecordDict encoding.

Shared by the ServerApp and the ClientApp (neither imports the other). A message is one ConfigRecord: its fields,
its metrics and every byte blob up to INLINE_BYTES (secure-aggregation stage messages, most bundles). Larger blobs
travel as uint8 Arrays in an ArrayRecord (Flower chunks them). Why so few records: Flower moves each record, array
and chunk as its own object, one HTTP request per hop, and a light secure-aggregation exchange (4 hops) was
mostly those requests: 7 objects per message before, 3 now.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedmoe.protocol.errors import ConfigError


class TrainStatus(StrEnum):
    """What a bank did with a train request."""

    OK = "ok"  # trained; the reply carries its encrypted update
    REFUSED = "refused"  # the bank's own policy or budget said no: nothing trained, nothing spent
    AGGREGATE_REJECTED = "aggregate-rejected"  # an aggregate it was sent failed validation: not applied
    # secure aggregation: it already released this round under other round keys (the server
    # restarted the round): it sits the round out rather than train twice or re-mask its update
    ALREADY_RELEASED = "already-released"


class SecAggStage(StrEnum):
    """One Flower exchange of a secure-aggregation round (docs/secagg.md), sent as "train.secagg_<stage>".

    IDENTIFY runs only for nodes the server has not bound to a bank yet: the bank signs who it is.
    REVEAL and ACCUSE run only after banks quarantined an aggregate (docs/secagg.md "Accountable rounds").
    """

    IDENTIFY = "identify"
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"  # the bank catches up, trains once, masks and encrypts its update
    CONSENT = "consent"
    UNMASK = "unmask"
    REVEAL = "reveal"  # accountability, after a quarantine: the evidence -> this bank's RoundReveal
    ACCUSE = "accuse"  # the evidence + the reveals -> this bank's signed Verdict

    @property
    def message_type(self) -> str:
        return f"train.secagg_{self.value}"


def identify_statement(*, job_id: str, round: int, bank_id: str, node_id: int) -> bytes:
    """What a bank signs with its identity key to bind its SuperNode to its pinned identity.

    Names the node, so a signature seen on the wire cannot bind another node to the bank.
    """
    body = {"type": "fedmoe/secagg-identify", "job_id": job_id, "round": round, "bank_id": bank_id, "node": node_id}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


_SECAGG_RESULT_MAGIC = b"FMSARES1"


def pack_secagg_result(setup: bytes, aggregate: bytes) -> bytes:
    """A secure-aggregation round's stored aggregate: its RoundSetup and its SecureAggregate (bytes each)."""
    return _SECAGG_RESULT_MAGIC + struct.pack(">Q", len(setup)) + setup + aggregate


def unpack_secagg_result(blob: bytes) -> tuple[bytes, bytes]:
    """(setup bytes, aggregate bytes); ConfigError when the blob is not a packed secagg result."""
    head = len(_SECAGG_RESULT_MAGIC) + 8
    if len(blob) < head or blob[: len(_SECAGG_RESULT_MAGIC)] != _SECAGG_RESULT_MAGIC:
        raise ConfigError(f"secagg result: expected magic {_SECAGG_RESULT_MAGIC!r}, got {bytes(blob[:8])!r}")
    (n,) = struct.unpack(">Q", blob[len(_SECAGG_RESULT_MAGIC) : head])
    if head + n > len(blob):
        raise ConfigError(f"secagg result: setup of {n} bytes overruns the {len(blob)}-byte blob")
    return bytes(blob[head : head + n]), bytes(blob[head + n :])


def _bytes_record(blobs: dict[str, bytes]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.frombuffer(blob, dtype=np.uint8)) for key, blob in blobs.items()})


def _record_bytes(record: ArrayRecord) -> dict[str, bytes]:
    return {key: array.numpy().tobytes() for key, array in record.items()}


INLINE_BYTES = 1 << 20  # blobs up to 1 MiB ride in the message's ConfigRecord; larger ones are chunked Arrays


def _put_blobs(content: RecordDict, config: ConfigRecord, record: str, blobs: dict[str, bytes]) -> None:
    """Blobs under `record`: small ones inline in `config` ("<record>/<key>"), large ones in an ArrayRecord."""
    large = {key: blob for key, blob in blobs.items() if len(blob) > INLINE_BYTES}
    for key, blob in blobs.items():
        if key not in large:
            config[f"{record}/{key}"] = bytes(blob)
    if large:
        content[record] = _bytes_record(large)


def _get_blobs(content: RecordDict, config: ConfigRecord, record: str) -> dict[str, bytes]:
    prefix = f"{record}/"
    blobs = {key[len(prefix) :]: value for key, value in config.items() if key.startswith(prefix)}
    for key, value in blobs.items():  # bytes(<int>) from a hostile peer would allocate that many bytes
        if not isinstance(value, bytes):
            raise ValueError(f"record {record!r}: blob {key!r} is {type(value).__name__}, expected bytes")
    if record in content:
        blobs.update(_record_bytes(content[record]))
    return blobs


def _put_metrics(config: ConfigRecord, metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        config[f"metric/{name}"] = float(value)


def _get_metrics(config: ConfigRecord) -> dict[str, float]:
    metrics = {key.removeprefix("metric/"): v for key, v in config.items() if key.startswith("metric/")}
    for name, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"metric {name!r} is {type(value).__name__}, expected a number")
    return {name: float(value) for name, value in metrics.items()}


def _require(content: RecordDict, key: str, kind: str) -> object:
    if key not in content:
        raise ConfigError(f"{kind} message: missing record {key!r}; has {sorted(content.keys())}")
    return content[key]


# A message's scalar fields travel in a ConfigRecord under kebab-case keys: (attribute, type) tables.
Fields = tuple[tuple[str, type], ...]


def _to_config(message: object, fields: Fields) -> ConfigRecord:
    values = {name: getattr(message, name) for name, _ in fields}
    return ConfigRecord({name.replace("_", "-"): str(v) if isinstance(v, StrEnum) else v for name, v in values.items()})


def _from_config(config: object, fields: Fields) -> dict:
    """The table's fields present in `config`, converted (an absent one keeps the dataclass default)."""
    keys = {name: name.replace("_", "-") for name, _ in fields}
    return {name: kind(config[keys[name]]) for name, kind in fields if keys[name] in config}


@dataclass(frozen=True)
class RoundRequest:
    """Server -> bank, for both train and evaluate: the round and the aggregates to catch up on."""

    job_id: str
    round: int
    key_id: str
    key_epoch: int
    aggregates: dict[int, bytes] = field(default_factory=dict)  # round -> encrypted sum bundle
    stage: SecAggStage | None = None  # a secure-aggregation exchange; None = a CKKS train / an evaluate
    secagg: bytes = b""  # the stage's fedmoe.crypto.secagg request message (to_bytes)
    # a later stage the bank runs in the same exchange (docs/secagg.md "Stages ahead"): with an
    # identify request this round's RoundSetup, with a masked-input request the next round's (the
    # bank advertises keys for it); with an unmask order the next round's ShareKeysRequest
    secagg_next: bytes = b""

    def check_job(self, job_id: str, bank_id: str) -> None:
        """Raises ConfigError when the message is for another job than the bank's run config."""
        if self.job_id != job_id:
            raise ConfigError(f"bank {bank_id}: message for job {self.job_id!r}, run config says {job_id!r}")

    def to_content(self) -> RecordDict:
        config = _to_config(self, REQUEST_FIELDS)
        config["secagg-stage"] = "" if self.stage is None else str(self.stage)
        content = RecordDict({"config": config})
        _put_blobs(content, config, "aggregates", {f"round-{r:04d}": blob for r, blob in self.aggregates.items()})
        blobs = {"message": self.secagg, "next": self.secagg_next}
        _put_blobs(content, config, "secagg", {key: blob for key, blob in blobs.items() if blob})
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> RoundRequest:
        cfg = _require(content, "config", "round request")
        stage = str(cfg.get("secagg-stage", ""))
        if stage and stage not in {s.value for s in SecAggStage}:
            raise ConfigError(f"round request: unknown secagg-stage {stage!r}; known {[str(s) for s in SecAggStage]}")
        aggregates = _get_blobs(content, cfg, "aggregates")
        secagg = _get_blobs(content, cfg, "secagg")
        return cls(
            **_from_config(cfg, REQUEST_FIELDS),
            aggregates={int(key.split("-")[1]): blob for key, blob in aggregates.items()},
            stage=SecAggStage(stage) if stage else None,
            secagg=secagg.get("message", b""),
            secagg_next=secagg.get("next", b""),
        )


REQUEST_FIELDS: Fields = (("job_id", str), ("round", int), ("key_id", str), ("key_epoch", int))


@dataclass(frozen=True)
class TrainReply:
    """Bank -> server after a train message (and after each secure-aggregation stage: `bundle` is then
    the stage's fedmoe.crypto.secagg reply message, or the identity signature for IDENTIFY)."""

    bank_id: str
    round: int
    status: TrainStatus
    applied_round: int
    start_hash: str
    bundle: bytes = b""
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    ledger_commitment: str = ""  # JSON commitment to the bank's ledger entry ("" if none): never n or epsilon
    rejected_round: int = 0  # with AGGREGATE_REJECTED: the round whose aggregate failed validation
    next_bundle: bytes = b""  # the reply to `RoundRequest.secagg_next`: a KeyAdvertisement or a ShareKeysReply
    # with the keys shared for a round (its share-keys stage, or ahead with the last round's unmask):
    # the bank's pre-flight for that round, PREFLIGHT_READY or the refusal ("": not checked)
    preflight: str = ""

    def to_content(self) -> RecordDict:
        config = _to_config(self, REPLY_FIELDS)
        _put_metrics(config, self.metrics)
        content = RecordDict({"bank": config})
        blobs = {"bundle": self.bundle, "next": self.next_bundle}
        _put_blobs(content, config, "update", {key: blob for key, blob in blobs.items() if blob})
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        info = _require(content, "bank", "train reply")
        blobs = _get_blobs(content, info, "update")
        return cls(
            **_from_config(info, REPLY_FIELDS),
            bundle=blobs.get("bundle", b""),
            next_bundle=blobs.get("next", b""),
            metrics=_get_metrics(info),
        )


REPLY_FIELDS: Fields = (
    ("bank_id", str), ("round", int), ("status", TrainStatus), ("applied_round", int), ("start_hash", str),
    ("reason", str), ("ledger_commitment", str), ("rejected_round", int), ("preflight", str),
)  # fmt: skip
PREFLIGHT_READY = "ready"  # TrainReply.preflight: nothing the bank checks would refuse the round
PREFLIGHT_NOT_READY = "not ready"  # its prefix when the check itself failed (not a policy refusal)


@dataclass(frozen=True)
class EvalReply:
    """Bank -> server after an evaluate message. The eval loss (not DP-protected) only where the
    bank's policy releases it; the size of the held-out set never."""

    bank_id: str
    round: int
    applied_round: int
    eval_loss: float | None = None
    rejected_round: int = 0  # the round whose aggregate it found invalid (nothing of it applied)
    reason: str = ""

    def to_content(self) -> RecordDict:
        config = _to_config(self, EVAL_FIELDS)
        _put_metrics(config, {} if self.eval_loss is None else {"eval-loss": self.eval_loss})
        return RecordDict({"bank": config})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvalReply:
        info = _require(content, "bank", "eval reply")
        metrics = _get_metrics(info)
        eval_loss = metrics.get("eval-loss")
        return cls(**_from_config(info, EVAL_FIELDS), eval_loss=eval_loss)


EVAL_FIELDS: Fields = (
    ("bank_id", str), ("round", int), ("applied_round", int), ("rejected_round", int), ("reason", str),
)  # fmt: skip
