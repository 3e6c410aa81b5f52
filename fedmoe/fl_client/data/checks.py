"""Record and argument checks shared by the loaders, the split and the packer.

Each raises DataError naming where (file and line, or record index), expected vs got.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fedmoe.fl_client.errors import DataError

PrivacyUnit = Literal["record", "customer"]  # one of fedmoe.protocol.config.PRIVACY_UNITS


def json_type(value: object) -> str:
    """The JSON name of a value's type ("null", "boolean", "number", ...), for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def got(value: object) -> str:
    return "null" if value is None else f"{json_type(value)} {short(value)}"


def check_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}, field 'text': expected a non-empty string, got {got(value)}")
    if not value.strip():
        raise DataError(f"{where}, field 'text': expected a non-empty string, got {short(value)}")
    return value


def check_customer_id(value: object, where: str) -> str:
    # Integer ids are common in bank exports; they become strings. Anything else is ambiguous.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}, field 'customer_id': expected a non-empty string or integer, got {got(value)}")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise DataError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def customer_ids(records: Sequence[dict[str, Any]]) -> list[str]:
    """Each record's customer_id, for privacy_unit="customer" (a non-empty string each)."""
    ids = []
    for i, record in enumerate(records):
        cid = record.get("customer_id")
        if not isinstance(cid, str) or not cid:
            raise DataError(
                f"record {i}: privacy_unit='customer' needs a non-empty string 'customer_id', got {got(cid)}"
            )
        ids.append(cid)
    return ids
