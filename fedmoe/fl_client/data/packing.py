"""Packing a bank's records into fixed-length token samples for next-token training.

What one sample holds decides what DP-SGD protects: one record (record-level DP) or all of one
customer's rows (customer-level DP).

Shape legend: n = samples, L = seq_len; `tokens` is (n, L+1), `inputs`/`targets` are (n, L).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedmoe.fl_client.data.checks import PrivacyUnit, check_choice, check_text, customer_ids, short
from fedmoe.fl_client.errors import DataError
from fedmoe.protocol.config import PRIVACY_UNITS

logger = logging.getLogger(__name__)

PackMode = Literal["concat", "per_record"]
PACK_MODES: tuple[str, ...] = ("concat", "per_record")
IGNORE_INDEX = -100  # target value that lm_loss / cross_entropy skip

# A packing: per sample, its token ids (untruncated), the records in it, its privacy unit.
Packing = tuple[list[list[int]], list[list[int]], list[str]]


@dataclass(frozen=True)
class PackedData:
    """Fixed-length token samples ready for next-token training.

    Attributes:
        tokens: LongTensor (n, L+1); real tokens first, then pad_id.
        targets: LongTensor (n, L) = tokens[:, 1:], with -100 where the target is padding.
        lengths: LongTensor (n,), real (non-padding) tokens in each sample.
        unit_ids: privacy unit of each sample: the customer_id ("customer"), "record-<i>"
            ("record", per_record) or "sample-<k>" ("record", concat: a sample holds several records).
        record_indices: for each sample, the indices (into the packed list) of the records with
            tokens in it; only in concat mode can a record appear in two samples.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    unit_ids: list[str]
    record_indices: list[list[int]]

    def __post_init__(self) -> None:
        n, l1 = self.tokens.shape
        assert self.targets.shape == (n, l1 - 1) and self.lengths.shape == (n,)
        assert len(self.unit_ids) == n and len(self.record_indices) == n

    @property
    def inputs(self) -> torch.Tensor:
        """LongTensor (n, L) = tokens[:, :-1]."""
        return self.tokens[:, :-1]

    @property
    def loss_mask(self) -> torch.Tensor:
        """BoolTensor (n, L), True where the target is a real token."""
        return self.targets != IGNORE_INDEX

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_records(
    records: Sequence[dict[str, Any]],
    *,
    encode: Callable[[str], list[int]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    privacy_unit: PrivacyUnit,
    mode: PackMode | None = None,
) -> PackedData:
    """Pack records into samples of seq_len + 1 token ids (inputs + shifted targets).

    Every record is encoded and followed by eos_id; a record cut by truncation keeps no EOS.
    Samples are right-padded with pad_id; their padding targets are -100.

    - privacy_unit="record", mode="per_record" (the default): one record per sample, truncated
      to seq_len + 1 tokens: the unit DP-SGD clips is exactly one record.
    - privacy_unit="record", mode="concat": the records, in order, form one stream (record, EOS,
      record, EOS, ...) cut greedily into windows of seq_len + 1 tokens with stride seq_len, so
      consecutive samples share one token and every next-token pair is trained exactly once;
      nothing is truncated and only the last sample is padded. A record may span two samples
      (record_indices lists it in both). Dense, for non-private training and eval.
    - privacy_unit="customer" (mode None or "concat"): one sample per customer holding as many of
      its records, whole and in input order, as fit (chosen shortest first): a sample is a customer.

    Args:
        records: dicts with a non-empty string "text" (and "customer_id" for customers).
        encode: tokenizer, str -> list of token ids.
        seq_len: L, tokens per input row (>= 1).
        eos_id, pad_id: end-of-record and padding ids (may be equal: padding is found by position).
        privacy_unit: "record" or "customer".
        mode: "per_record" or "concat"; None picks the default for the privacy unit.

    Returns:
        PackedData with tokens (n, L+1), targets (n, L), lengths, unit_ids, record_indices.

    Raises:
        DataError: no records, bad arguments, a record without text (or without customer_id
            when privacy_unit="customer"), or a text that encodes to no tokens.
    """
    mode = _check_pack_args(
        records, seq_len=seq_len, eos_id=eos_id, pad_id=pad_id, privacy_unit=privacy_unit, mode=mode
    )
    width = seq_len + 1
    encoded = _encode_records(records, encode, eos_id)
    if privacy_unit == "customer":
        seqs, members, unit_ids = _pack_customers(records, encoded, width)
    elif mode == "per_record":
        seqs, members, unit_ids = _pack_per_record(encoded)
    else:
        seqs, members, unit_ids = _pack_concat(encoded, seq_len)
    tokens, lengths, n_truncated = _pad_rows(seqs, width, pad_id)
    targets = tokens[:, 1:].clone()  # (n, L)
    # Position j predicts token j+1, which is real only while j + 1 < length.
    targets[torch.arange(seq_len)[None, :] >= (lengths - 1)[:, None]] = IGNORE_INDEX
    n = len(seqs)
    if n_truncated:
        logger.warning(
            "pack_records: %d of %d samples truncated to %d tokens (privacy_unit=%s, mode=%s)",
            n_truncated,
            n,
            width,
            privacy_unit,
            mode,
        )
    logger.info(
        "packed %d records into %d samples of %d tokens (privacy_unit=%s, mode=%s, %.1f%% padding)",
        len(records),
        n,
        width,
        privacy_unit,
        mode,
        100.0 * (1.0 - float(lengths.sum()) / (n * width)),
    )
    return PackedData(tokens, targets, lengths, unit_ids, members)


def _check_pack_args(
    records: Sequence[dict[str, Any]], *, seq_len: int, eos_id: int, pad_id: int, privacy_unit: str, mode: str | None
) -> str:
    """Validate pack_records' arguments; returns the mode, resolved from the privacy unit when None."""
    check_choice("pack_records: privacy_unit", privacy_unit, PRIVACY_UNITS)
    if mode is not None:
        check_choice("pack_records: mode", mode, PACK_MODES)
    if privacy_unit == "customer" and mode == "per_record":
        raise DataError(
            "pack_records: mode expected None or 'concat' with privacy_unit='customer' "
            "(a sample holds all of a customer's records), got 'per_record'"
        )
    if seq_len < 1:
        raise DataError(f"pack_records: seq_len expected >= 1, got {seq_len}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"pack_records: {name} expected an integer >= 0, got {short(value)}")
    if not records:
        raise DataError("pack_records: expected at least one record, got none")
    return mode or ("per_record" if privacy_unit == "record" else "concat")


def _encode_records(
    records: Sequence[dict[str, Any]], encode: Callable[[str], list[int]], eos_id: int
) -> list[list[int]]:
    """Each record's token ids followed by eos_id."""
    encoded: list[list[int]] = []
    for i, record in enumerate(records):
        ids = list(encode(check_text(record.get("text"), f"record {i}")))
        if not ids:
            raise DataError(f"record {i}, field 'text': expected text that encodes to >= 1 token, got none")
        encoded.append(ids + [eos_id])
    return encoded


def _pack_customers(records: Sequence[dict[str, Any]], encoded: list[list[int]], width: int) -> Packing:
    """One sample per customer: as many of their records, whole, as fit in `width` tokens.

    Whole records are chosen shortest first (the most that fit) and kept in input order; the space
    left holds the next record in input order, truncated. What does not fit is dropped, never spread
    over a second sample (one unit = one sample for DP-SGD).
    """
    by_customer: dict[str, list[int]] = {}
    for i, cid in enumerate(customer_ids(records)):
        by_customer.setdefault(cid, []).append(i)
    seqs: list[list[int]] = []
    members: list[list[int]] = []
    for idxs in by_customer.values():
        included: list[int] = []
        used = 0
        for i in sorted(idxs, key=lambda i: len(encoded[i])):
            if used + len(encoded[i]) > width:
                break
            included.append(i)
            used += len(encoded[i])
        included.sort()
        rest = [i for i in idxs if i not in set(included)]
        if rest and used < width:  # the space left: the next record in input order, truncated
            included.append(rest[0])
        seqs.append([t for i in included for t in encoded[i]])
        members.append(included)
    kept = sum(len(m) for m in members)
    if kept < len(records):
        logger.info("pack_records: customer samples keep %d of %d records whole (one sample per customer)",
                    kept, len(records))  # fmt: skip
    return seqs, members, list(by_customer)


def _pack_per_record(encoded: list[list[int]]) -> Packing:
    """One sample per record."""
    n = len(encoded)
    return encoded, [[i] for i in range(n)], [f"record-{i}" for i in range(n)]


def _pack_concat(encoded: list[list[int]], seq_len: int) -> Packing:
    """The records as one stream, cut into windows of seq_len + 1 tokens with stride seq_len."""
    stream = [t for ids in encoded for t in ids]
    ends = np.cumsum([len(ids) for ids in encoded])  # record i spans [ends[i] - len_i, ends[i])
    starts = ends - np.array([len(ids) for ids in encoded])
    n_windows = math.ceil((len(stream) - 1) / seq_len)  # window k trains pairs (t, t+1), t in [kL, kL+L)
    seqs: list[list[int]] = []
    members: list[list[int]] = []
    for k in range(n_windows):
        lo, hi = k * seq_len, min(k * seq_len + seq_len + 1, len(stream))
        seqs.append(stream[lo:hi])
        members.append(np.flatnonzero((starts < hi) & (ends > lo)).tolist())
    return seqs, members, [f"sample-{k}" for k in range(n_windows)]


def _pad_rows(seqs: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows truncated or right-padded to `width`: tokens (n, width), lengths (n,), rows truncated."""
    tokens = np.full((len(seqs), width), pad_id, dtype=np.int64)
    lengths = np.empty(len(seqs), dtype=np.int64)
    n_truncated = 0
    for row, seq in enumerate(seqs):
        if len(seq) > width:
            n_truncated += 1
            seq = seq[:width]
        tokens[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return torch.from_numpy(tokens), torch.from_numpy(lengths), n_truncated
