"""A bank's own data file: validated JSONL, CSV and Parquet loaders, and a JSONL writer.

Every record needs a non-empty string `text`; `customer_id` (string or integer) is optional,
but present in every record or in none. Errors name the file and line (or row), expected vs got.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedmoe.fl_client.data.checks import check_customer_id, check_text, json_type
from fedmoe.fl_client.errors import DataError
from fedmoe.protocol.files import atomic_write_text

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv", ".parquet")
_EXPECTED_COLUMNS = "a 'text' column (non-empty strings) and optionally 'customer_id'"


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError, line_offset: int = 0) -> DataError:
    line = data.count(b"\n", 0, err.start) + 1 + line_offset
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    bad = data[err.start : err.start + 1].hex()
    return DataError(f"{path}, line {line}: expected UTF-8 text, got invalid byte 0x{bad} at byte column {column}")


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    has_customer: bool | None = None
    first_line = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, raw, err, line_offset=line_no - 1) from None
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) carry no record
            where = f"{path}, line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                got = f"invalid JSON ({err.msg} at column {err.colno})"
                raise DataError(f"{where}: expected a JSON object, got {got}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {json_type(obj)}")
            if "text" not in obj:
                raise DataError(f"{where}: missing field 'text'; expected {_EXPECTED_COLUMNS}, got keys {sorted(obj)}")
            record = {"text": check_text(obj["text"], where)}
            if has_customer is None:
                has_customer, first_line = "customer_id" in obj, line_no
            if has_customer != ("customer_id" in obj):
                raise DataError(
                    f"{where}: field 'customer_id' expected in every record or in none (line {first_line} "
                    f"{'has' if has_customer else 'lacks'} it), "
                    f"got a record that {'lacks' if has_customer else 'has'} it"
                )
            if has_customer:
                record["customer_id"] = check_customer_id(obj["customer_id"], where)
            records.append(record)
    return records


def _load_csv(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")  # tolerate the byte-order mark spreadsheets write
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, data, err) from None
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as err:
        raise DataError(f"{path}, line 1: expected a header with {_EXPECTED_COLUMNS}, got {err or 'nothing'}") from None
    if "text" not in header:
        raise DataError(f"{path}, line 1: header has no 'text' column; expected {_EXPECTED_COLUMNS}, got {header}")
    text_col = header.index("text")
    cid_col = header.index("customer_id") if "customer_id" in header else None
    records: list[dict[str, Any]] = []
    line_no = reader.line_num
    while True:
        start = line_no + 1  # a quoted field may span lines: report where the row starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}, line {start}: expected a CSV row, got a malformed one ({err})") from None
        line_no = reader.line_num
        if not row:
            continue
        where = f"{path}, line {start}"
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} fields (as the header {header}), got {len(row)}")
        record = {"text": check_text(row[text_col], where)}
        if cid_col is not None:
            record["customer_id"] = check_customer_id(row[cid_col], where)
        records.append(record)
    return records


def _parquet_columns(path: Path, schema: Any) -> list[str]:
    """The columns to read ("text", and "customer_id" when present), after checking their types."""
    import pyarrow as pa

    if "text" not in schema.names:
        raise DataError(f"{path}: no 'text' column; expected {_EXPECTED_COLUMNS}, got columns {schema.names}")
    columns = ["text"] + (["customer_id"] if "customer_id" in schema.names else [])
    string_like = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", lambda t: False))
    for name in columns:
        kind = schema.field(name).type
        value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        ok = any(f(value_kind) for f in string_like) or (name == "customer_id" and pa.types.is_integer(value_kind))
        if not ok:
            expected = "string" if name == "text" else "string or integer"
            raise DataError(f"{path}, column '{name}': expected {expected} type, got {kind}")
    return columns


def _parquet_values(path: Path, table: Any, name: str) -> list[Any]:
    column = table.column(name)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for row, scalar in enumerate(column):  # slow path only to name the bad row
            try:
                scalar.as_py()
            except UnicodeDecodeError:
                where = f"{path}, row {row} (0-based), field '{name}'"
                raise DataError(f"{where}: expected UTF-8 text, got invalid bytes") from None
        raise


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: expected a Parquet file, got one pyarrow cannot read ({err})") from None
    columns = _parquet_columns(path, schema)
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: expected a readable Parquet file, got an error ({err})") from None
    texts = _parquet_values(path, table, "text")
    ids = _parquet_values(path, table, "customer_id") if "customer_id" in columns else None
    records: list[dict[str, Any]] = []
    for row, text in enumerate(texts):
        where = f"{path}, row {row} (0-based)"
        record = {"text": check_text(text, where)}
        if ids is not None:
            record["customer_id"] = check_customer_id(ids[row], where)
        records.append(record)
    return records


def load_text_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load a bank's own records from JSONL, CSV (with a header) or Parquet, validating every row.

    Each record needs a non-empty string `text`; `customer_id` (string or integer) is optional,
    but present in every record or in none. Other fields are ignored.

    Args:
        path: a .jsonl, .csv or .parquet file.

    Returns:
        Records as dicts with "text" and, when the file has one, "customer_id" (str).

    Raises:
        DataError: missing or empty file, unsupported extension, unreadable Parquet, missing
            `text` column/field, a non-string or empty text, a bad customer_id, or a line that
            is not UTF-8 (or not JSON). The message names the file and the 1-based line (JSONL,
            CSV) or the 0-based row (Parquet), with expected vs got.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {list(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a {suffix} file with {_EXPECTED_COLUMNS}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file; expected at least one record with {_EXPECTED_COLUMNS}")
    loader = {".jsonl": _load_jsonl, ".csv": _load_csv, ".parquet": _load_parquet}[suffix]
    records = loader(path)
    if not records:
        raise DataError(f"{path}: empty file (no records); expected at least one record with {_EXPECTED_COLUMNS}")
    logger.info("loaded %d records from %s", len(records), path)
    return records


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as UTF-8 JSON lines, atomically (fedmoe.protocol.files); returns the path."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return atomic_write_text(Path(path), lines)
