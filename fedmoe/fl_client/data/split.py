"""Train/eval split of a bank's records, deterministic by seed, by record or by customer."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from fedmoe.fl_client.data.checks import PrivacyUnit, check_choice, customer_ids
from fedmoe.fl_client.errors import DataError
from fedmoe.protocol.config import PRIVACY_UNITS

logger = logging.getLogger(__name__)


def _unit_rank(seed: int, unit: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{unit}".encode(), digest_size=16).digest()


def train_eval_split(
    records: Sequence[dict[str, Any]], *, eval_fraction: float = 0.1, seed: int, privacy_unit: PrivacyUnit
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into train and eval sets, deterministically by seed.

    Units (records, or customers when privacy_unit="customer") are ranked by a keyed hash of
    (seed, unit) and the first round(eval_fraction * n_units) go to eval (at least one and at
    most n_units - 1 when 0 < eval_fraction and there are >= 2 units). Customer ranks do not
    depend on record order, and one customer's records never straddle the two sets.

    Args:
        records: dicts; with privacy_unit="customer" each needs a string "customer_id".
        eval_fraction: share of units held out, in [0, 1).
        seed: the same seed and records give the same split.
        privacy_unit: "record" or "customer".

    Returns:
        (train, eval), each in the input order.

    Raises:
        DataError: bad eval_fraction or privacy_unit, or a record without customer_id when
            privacy_unit="customer".
    """
    check_choice("train_eval_split: privacy_unit", privacy_unit, PRIVACY_UNITS)
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"train_eval_split: eval_fraction expected in [0, 1), got {eval_fraction}")
    keys = customer_ids(records) if privacy_unit == "customer" else [str(i) for i in range(len(records))]
    units = sorted(set(keys))
    n_eval = round(eval_fraction * len(units))
    if eval_fraction > 0 and len(units) >= 2:
        n_eval = min(max(n_eval, 1), len(units) - 1)
    elif eval_fraction > 0:
        logger.warning("train_eval_split: only %d %s unit(s); the eval set is empty", len(units), privacy_unit)
    eval_units = set(sorted(units, key=lambda u: _unit_rank(seed, u))[:n_eval])
    train = [r for r, k in zip(records, keys, strict=True) if k not in eval_units]
    held_out = [r for r, k in zip(records, keys, strict=True) if k in eval_units]
    logger.info(
        "split %d records by %s: %d train, %d eval (%d of %d units)",
        len(records),
        privacy_unit,
        len(train),
        len(held_out),
        n_eval,
        len(units),
    )
    return train, held_out
