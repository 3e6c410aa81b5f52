"""fedmoe.fl_client.data: synthetic bank corpus, file loading and validation, split, packing."""

from __future__ import annotations

import csv
import json
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedmoe.fl_client.data import (
    BANK_LOCALES,
    KINDS,
    LOCALE_STYLES,
    SUPPORTED_SUFFIXES,
    BankProfile,
    generate_bank_corpus,
    load_text_file,
    make_bank_profiles,
    pack_records,
    train_eval_split,
    write_jsonl,
)
from fedmoe.fl_client.errors import DataError

EOS, PAD = 256, 257


def encode(s: str) -> list[int]:
    return list(s.encode("utf-8"))


@pytest.fixture(scope="module")
def profiles() -> list[BankProfile]:
    return make_bank_profiles(3, seed=0)


@pytest.fixture(scope="module")
def corpora(profiles: list[BankProfile]) -> list[list[dict]]:
    return [generate_bank_corpus(p, 2000, seed=0) for p in profiles]


# --- profiles and corpus ----------------------------------------------------------------------


def test_profiles_are_deterministic_and_distinct():
    a, b = make_bank_profiles(5, seed=3), make_bank_profiles(5, seed=3)
    assert a == b
    assert make_bank_profiles(5, seed=4) != a
    assert [p.locale for p in a] == list(BANK_LOCALES[:5])
    assert len({p.bank_id for p in a}) == 5
    assert len({p.fraud_rate for p in a}) == 5
    assert max(p.fraud_rate for p in a) / min(p.fraud_rate for p in a) > 5  # spread over [1%, 12%]


def test_profiles_cycle_locales_beyond_the_table():
    many = make_bank_profiles(len(BANK_LOCALES) + 2, seed=0)
    assert many[len(BANK_LOCALES)].locale == many[0].locale
    assert len({p.bank_id for p in many}) == len(many)
    for p in many:
        assert p.currency == LOCALE_STYLES[p.locale].currency


def test_profile_validation_names_the_field(profiles):
    base = profiles[0]
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(DataError, match="fraud_rate"):
        BankProfile(**{**fields, "fraud_rate": 1.5})
    with pytest.raises(DataError, match="locale"):
        BankProfile(**{**fields, "locale": "xx_XX"})
    with pytest.raises(DataError, match="merchant_mix"):
        BankProfile(**{**fields, "merchant_mix": (("casinos_on_mars", 1.0),)})
    with pytest.raises(DataError, match="n_banks"):
        make_bank_profiles(0, seed=0)


def test_corpus_is_deterministic_by_seed(profiles):
    a = generate_bank_corpus(profiles[1], 300, seed=7)
    assert a == generate_bank_corpus(profiles[1], 300, seed=7)
    assert a != generate_bank_corpus(profiles[1], 300, seed=8)
    assert generate_bank_corpus(profiles[1], 0, seed=7) == []


def test_records_have_the_schema(profiles, corpora):
    for profile, records in zip(profiles, corpora, strict=True):
        assert len(records) == 2000
        for r in records:
            assert set(r) == {"text", "customer_id", "bank_id", "kind", "is_fraud"}
            assert isinstance(r["text"], str) and r["text"].strip()
            assert isinstance(r["customer_id"], str) and r["customer_id"].startswith(profile.bank_id + "-c")
            assert r["bank_id"] == profile.bank_id
            assert r["kind"] in KINDS
            assert isinstance(r["is_fraud"], bool)
        per_customer = Counter(r["customer_id"] for r in records)
        assert 1 < len(per_customer) < len(records)  # customers have several records each
        assert set(Counter(r["kind"] for r in records)) == set(KINDS)


def test_banks_differ_in_currency_language_and_mix(profiles, corpora):
    texts = [" ".join(r["text"] for r in records) for records in corpora]
    assert [p.locale for p in profiles] == ["en_US", "de_DE", "fr_FR"]
    # Home-currency amounts: "$12.34" (US), "12,34 EUR" (DE/FR, decimal comma).
    assert len(re.findall(r"\$\d", texts[0])) > 500 and not re.search(r"\d,\d\d EUR", texts[0])
    for text in texts[1:]:
        assert len(re.findall(r"\d,\d\d EUR", text)) > 500 and not re.search(r"\$\d", text)
    assert "CARD PAYMENT" in texts[0] and "KARTENZAHLUNG" in texts[1] and "PAIEMENT CB" in texts[2]
    assert "KARTENZAHLUNG" not in texts[0] + texts[2]

    # Banks differ more from each other than one bank's halves do (byte-frequency total variation).
    def freq(records):
        c = Counter(b for r in records for b in r["text"].encode())
        n = sum(c.values())
        return {k: v / n for k, v in c.items()}

    def tv(p, q):
        return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))

    within = tv(freq(corpora[1][:1000]), freq(corpora[1][1000:]))
    between = min(tv(freq(corpora[i]), freq(corpora[j])) for i, j in ((0, 1), (0, 2), (1, 2)))
    assert between > 5 * within


def test_fraud_rate_follows_the_profile_and_shows_in_the_text(profiles):
    measured = []
    for profile in profiles:
        records = generate_bank_corpus(profile, 4000, seed=1)
        frauds = [r for r in records if r["is_fraud"]]
        measured.append(len(frauds) / len(records))
        rate = profile.fraud_rate
        assert abs(len(frauds) / len(records) - rate) < 4 * (rate * (1 - rate) / len(records)) ** 0.5 + 1e-3
        # Fraudulent transactions happen at night (00:00-05:59), where legitimate ones are rare.
        night = re.compile(r"\b0[0-5]:\d\d\b")
        fraud_tx = [r["text"] for r in frauds if r["kind"] == "transaction"]
        assert fraud_tx and all(night.search(t) for t in fraud_tx)
        legit_tx = [r["text"] for r in records if r["kind"] == "transaction" and not r["is_fraud"]]
        assert sum(bool(night.search(t)) for t in legit_tx) / len(legit_tx) < 0.1
    order = sorted(range(3), key=lambda i: profiles[i].fraud_rate)
    assert sorted(range(3), key=lambda i: measured[i]) == order


def test_generation_is_fast(profiles):
    generate_bank_corpus(profiles[0], 10, seed=0)  # Faker's locale data loads once per process
    start = time.perf_counter()
    records = generate_bank_corpus(profiles[0], 5000, seed=0)
    assert len(records) == 5000
    assert time.perf_counter() - start < 3.0


# --- loading and validation -------------------------------------------------------------------


def test_jsonl_roundtrip_with_write_jsonl(tmp_path, corpora):
    path = write_jsonl(corpora[2][:50], tmp_path / "sub" / "bank.jsonl")
    loaded = load_text_file(path)
    assert [r["text"] for r in loaded] == [r["text"] for r in corpora[2][:50]]
    assert [r["customer_id"] for r in loaded] == [r["customer_id"] for r in corpora[2][:50]]
    assert [p.name for p in path.parent.iterdir()] == ["bank.jsonl"]  # no temp file left behind


def test_write_jsonl_is_atomic_on_failure(tmp_path):
    path = write_jsonl([{"text": "old"}], tmp_path / "a.jsonl")
    with pytest.raises(TypeError):
        write_jsonl([{"text": "new"}, {"text": object()}], path)
    assert load_text_file(path) == [{"text": "old"}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_csv_roundtrip_with_quotes_newlines_and_int_ids(tmp_path):
    path = tmp_path / "bank.csv"
    rows = [('a, quoted "one"', 7), ("two\nlines", 8), ("drei ü", 7)]
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "customer_id"])
        for i, (text, cid) in enumerate(rows):
            w.writerow([i, text, cid])
    loaded = load_text_file(path)
    assert loaded == [{"text": t, "customer_id": str(c)} for t, c in rows]


def test_parquet_roundtrip_without_customer_id(tmp_path):
    path = tmp_path / "bank.parquet"
    pq.write_table(pa.table({"text": ["eins", "zwei"], "other": [1, 2]}), path)
    assert load_text_file(path) == [{"text": "eins"}, {"text": "zwei"}]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _jsonl(*objs: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


GOOD = {"text": "ok", "customer_id": "c1"}


@pytest.mark.parametrize(
    ("name", "data", "where", "expected"),
    [
        ("empty.jsonl", b"", None, "empty"),
        ("blank.jsonl", b"\n  \n", None, "empty"),
        ("empty.csv", b"", None, "empty"),
        ("header_only.csv", b"text,customer_id\n", None, "empty"),
        ("empty.parquet", b"", None, "empty"),
        ("wrong_column.jsonl", _jsonl(GOOD, {"body": "x", "customer_id": "c1"}), "line 2", "missing field 'text'"),
        ("number_text.jsonl", _jsonl(GOOD, GOOD, {"text": 5, "customer_id": "c2"}), "line 3", "got number 5"),
        ("empty_text.jsonl", _jsonl({"text": "  "}), "line 1", "non-empty string"),
        ("bad_json.jsonl", _jsonl(GOOD) + b'{"text": "x",\n', "line 2", "invalid JSON"),
        ("not_object.jsonl", _jsonl(GOOD, ["a"]), "line 2", "got array"),
        ("bad_utf8.jsonl", _jsonl(GOOD, GOOD) + b'{"text": "caf\xe9"}\n', "line 3", "UTF-8"),
        ("bad_id.jsonl", _jsonl(GOOD, {"text": "x", "customer_id": None}), "line 2", "customer_id"),
        ("mixed_ids.jsonl", _jsonl(GOOD, GOOD, {"text": "x"}), "line 3", "customer_id"),
        ("no_text_header.csv", b"body,customer_id\nhello,c1\n", "line 1", "no 'text' column"),
        ("empty_cell.csv", b"text,customer_id\nhello,c1\n,c2\n", "line 3", "non-empty string"),
        ("bad_utf8.csv", b"text\nfine\nna\xefve\n", "line 3", "UTF-8"),
        ("short_row.csv", b"text,customer_id\nhello,c1\nbye\n", "line 3", "expected 2 fields"),
        ("garbage.parquet", b"not a parquet file at all", None, "Parquet"),
    ],
)
def test_bad_files_raise_data_error_naming_file_and_line(tmp_path, name, data, where, expected):
    path = _write(tmp_path / name, data)
    with pytest.raises(DataError) as info:
        load_text_file(path)
    message = str(info.value)
    assert name in message
    if where is not None:
        assert where in message
    assert expected in message


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl.*not found"):
        load_text_file(tmp_path / "nope.jsonl")
    path = _write(tmp_path / "notes.txt", b"hello\n")
    with pytest.raises(DataError) as info:
        load_text_file(path)
    assert "notes.txt" in str(info.value)
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in str(info.value)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (pa.table({"body": ["a", "b"]}), "no 'text' column"),
        (pa.table({"text": [1, 2]}), "expected string type, got int64"),
        (pa.table({"text": ["a", None, "c"]}), "row 1 (0-based), field 'text'"),
        (pa.table({"text": ["a", ""]}), "row 1 (0-based), field 'text'"),
        (pa.table({"text": ["a"], "customer_id": [1.5]}), "column 'customer_id'"),
        (pa.table({"text": pa.array([], pa.string())}), "empty"),
    ],
)
def test_bad_parquet_raises_data_error(tmp_path, table, expected):
    path = tmp_path / "bank.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as info:
        load_text_file(path)
    assert "bank.parquet" in str(info.value) and expected in str(info.value)


# --- split ------------------------------------------------------------------------------------


def test_split_by_record_is_deterministic_and_partitions(corpora):
    records = corpora[0]
    train, held = train_eval_split(records, eval_fraction=0.2, seed=5, privacy_unit="record")
    assert (train, held) == train_eval_split(records, eval_fraction=0.2, seed=5, privacy_unit="record")
    assert len(held) == 400 and len(train) == 1600
    assert sorted(map(id, train + held)) == sorted(map(id, records))
    other, _ = train_eval_split(records, eval_fraction=0.2, seed=6, privacy_unit="record")
    assert other != train


def test_split_by_customer_never_straddles(corpora):
    records = corpora[1]
    train, held = train_eval_split(records, eval_fraction=0.25, seed=1, privacy_unit="customer")
    assert (train, held) == train_eval_split(records, eval_fraction=0.25, seed=1, privacy_unit="customer")
    train_ids, held_ids = {r["customer_id"] for r in train}, {r["customer_id"] for r in held}
    assert train_ids and held_ids and not train_ids & held_ids
    assert len(train) + len(held) == len(records)
    n_customers = len(train_ids | held_ids)
    assert len(held_ids) == round(0.25 * n_customers)
    # A customer's side depends on (seed, customer), not on the order of the records.
    _, held_rev = train_eval_split(records[::-1], eval_fraction=0.25, seed=1, privacy_unit="customer")
    assert {r["customer_id"] for r in held_rev} == held_ids


def test_split_edge_cases_and_errors():
    records = [{"text": f"t{i}", "customer_id": "only"} for i in range(5)]
    train, held = train_eval_split(records, eval_fraction=0.5, seed=0, privacy_unit="customer")
    assert len(train) == 5 and held == []  # one customer cannot be split
    train, held = train_eval_split(records, eval_fraction=0.0, seed=0, privacy_unit="record")
    assert len(train) == 5 and held == []
    train, held = train_eval_split(records[:2], eval_fraction=0.01, seed=0, privacy_unit="record")
    assert len(train) == 1 and len(held) == 1  # a positive fraction holds out at least one unit
    with pytest.raises(DataError, match="eval_fraction"):
        train_eval_split(records, eval_fraction=1.0, seed=0, privacy_unit="record")
    with pytest.raises(DataError, match="privacy_unit"):
        train_eval_split(records, eval_fraction=0.1, seed=0, privacy_unit="bank")
    with pytest.raises(DataError, match="record 1: .*customer_id"):
        train_eval_split([{"text": "a", "customer_id": "x"}, {"text": "b"}], seed=0, privacy_unit="customer")


# --- packing ----------------------------------------------------------------------------------


def _pack(records, **kw):
    return pack_records(records, encode=encode, eos_id=EOS, pad_id=PAD, **kw)


def _real(row: torch.Tensor, length: int) -> list[int]:
    return row[:length].tolist()


def test_per_record_packing_shapes_eos_and_padding():
    records = [{"text": "hello"}, {"text": "hi"}, {"text": "ünï"}]
    packed = _pack(records, seq_len=8, privacy_unit="record", mode="per_record")
    assert packed.tokens.shape == (3, 9) and packed.tokens.dtype == torch.long
    assert packed.inputs.shape == packed.targets.shape == packed.loss_mask.shape == (3, 8)
    assert packed.loss_mask.dtype == torch.bool and len(packed) == 3
    assert packed.unit_ids == ["record-0", "record-1", "record-2"]
    assert packed.record_indices == [[0], [1], [2]]
    for row, record in enumerate(records):
        ids = encode(record["text"]) + [EOS]
        n = len(ids)
        assert packed.lengths[row] == n
        assert packed.tokens[row].tolist() == ids + [PAD] * (9 - n)
        # Targets are the next tokens up to and including EOS, then -100 over the padding.
        assert packed.targets[row].tolist() == ids[1:] + [-100] * (9 - n)
        assert packed.inputs[row].tolist() == (ids + [PAD] * (9 - n))[:8]
    assert int(packed.loss_mask.sum()) == int((packed.lengths - 1).sum())


def test_per_record_is_the_default_and_truncates_without_eos():
    packed = _pack([{"text": "x" * 20}, {"text": "y"}], seq_len=6, privacy_unit="record")
    assert packed.tokens[0].tolist() == [ord("x")] * 7  # cut record: no EOS, every target real
    assert packed.targets[0].tolist() == [ord("x")] * 6
    assert packed.tokens[1].tolist() == [ord("y"), EOS] + [PAD] * 5


def test_concat_cuts_one_stream_with_stride_seq_len():
    records = [{"text": t} for t in ["aaa", "bb", "cccc", "d", "eeeeeeeeeeee", "ff"]]
    stream = [t for r in records for t in encode(r["text"]) + [EOS]]  # 30 tokens
    packed = _pack(records, seq_len=8, privacy_unit="record", mode="concat")
    assert packed.tokens.shape == (4, 9)
    for k in range(4):
        window = stream[8 * k : 8 * k + 9]
        assert packed.tokens[k].tolist() == window + [PAD] * (9 - len(window))
        # Consecutive windows share one token, so each next-token pair is a target exactly once.
        assert packed.targets[k].tolist() == window[1:] + [-100] * (9 - len(window))
    assert packed.record_indices == [[0, 1, 2], [2, 3, 4], [4], [4, 5]]
    assert packed.unit_ids == [f"sample-{k}" for k in range(4)]
    assert int(packed.loss_mask.sum()) == len(stream) - 1  # nothing truncated, nothing twice


def test_concat_keeps_every_record(corpora):
    records = corpora[0][:300]
    packed = _pack(records, seq_len=256, privacy_unit="record", mode="concat")
    assert sorted({i for group in packed.record_indices for i in group}) == list(range(300))
    assert len(packed) < 300  # several records per sample
    n_tokens = sum(len(encode(r["text"])) + 1 for r in records)
    assert int(packed.loss_mask.sum()) == n_tokens - 1
    assert int((packed.targets == EOS).sum()) == 300  # every record's EOS is a target once


def test_customer_packing_one_sample_per_customer():
    records = [
        {"text": "a1", "customer_id": "A"},
        {"text": "b1", "customer_id": "B"},
        {"text": "a2", "customer_id": "A"},
        {"text": "c1" * 10, "customer_id": "C"},
    ]
    packed = _pack(records, seq_len=10, privacy_unit="customer")
    assert packed.unit_ids == ["A", "B", "C"]
    assert packed.record_indices == [[0, 2], [1], [3]]
    assert packed.tokens[0].tolist() == encode("a1") + [EOS] + encode("a2") + [EOS] + [PAD] * 5
    assert packed.tokens[1].tolist() == encode("b1") + [EOS] + [PAD] * 8
    assert packed.tokens[2].tolist() == encode("c1" * 10)[:11]  # truncated
    assert packed.targets[1].tolist() == encode("b1")[1:] + [EOS] + [-100] * 8


def test_customer_split_then_pack_keeps_customers_apart(corpora):
    train, held = train_eval_split(corpora[2], eval_fraction=0.2, seed=0, privacy_unit="customer")
    a = _pack(train, seq_len=512, privacy_unit="customer")
    b = _pack(held, seq_len=512, privacy_unit="customer", mode="concat")
    assert len(set(a.unit_ids)) == len(a) and len(set(b.unit_ids)) == len(b)
    assert not set(a.unit_ids) & set(b.unit_ids)
    assert len(a) + len(b) == len({r["customer_id"] for r in corpora[2]})


def test_pad_equal_to_eos_is_masked_by_position():
    packed = pack_records([{"text": "ab"}], encode=encode, seq_len=5, eos_id=EOS, pad_id=EOS, privacy_unit="record")
    assert packed.tokens[0].tolist() == [97, 98, EOS, EOS, EOS, EOS]
    assert packed.targets[0].tolist() == [98, EOS, -100, -100, -100]


def test_padding_targets_are_ignored_by_the_loss():
    packed = _pack([{"text": "abc"}, {"text": "abcdefg"}], seq_len=8, privacy_unit="record")
    logits = torch.randn(2, 8, 258, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 258), packed.targets.reshape(-1))
    mask = packed.loss_mask.reshape(-1)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 258)[mask], packed.targets.reshape(-1)[mask])
    torch.testing.assert_close(loss, manual)


@pytest.mark.parametrize(
    ("records", "kwargs", "match"),
    [
        ([], {"privacy_unit": "record"}, "at least one record"),
        ([{"text": "a"}], {"privacy_unit": "customer"}, r"record 0: .*customer_id"),
        ([{"text": "a", "customer_id": "x"}], {"privacy_unit": "customer", "mode": "per_record"}, "per_record"),
        ([{"text": "a"}], {"privacy_unit": "record", "mode": "stream"}, "mode"),
        ([{"text": "a"}], {"privacy_unit": "user"}, "privacy_unit"),
        ([{"text": "a"}], {"privacy_unit": "record", "seq_len": 0}, "seq_len"),
        ([{"text": "a"}, {"text": ""}], {"privacy_unit": "record"}, "record 1, field 'text'"),
        ([{"body": "a"}], {"privacy_unit": "record"}, "record 0, field 'text'"),
    ],
)
def test_pack_errors(records, kwargs, match):
    kwargs = {"seq_len": 8, **kwargs}
    with pytest.raises(DataError, match=match):
        _pack(records, **kwargs)


def test_the_synthetic_corpus_is_the_same_in_every_process():
    """Each ClientApp message runs in a fresh process: a bank's records (and its dataset
    fingerprint, the key of its lifetime budget) must not depend on Python's hash seed."""
    import subprocess
    import sys

    code = (
        "import hashlib, json\n"
        "from fedmoe.fl_client.data import make_bank_profiles, generate_bank_corpus\n"
        "ps = make_bank_profiles(8, seed=0)\n"
        "print([hashlib.sha256(json.dumps(generate_bank_corpus(p, 20, seed=0), sort_keys=True, default=str)"
        ".encode()).hexdigest() for p in ps])\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1, outputs


def test_customer_packing_keeps_the_most_whole_records_that_fit():
    """Issue 26: the old packing took a customer's records in order and cut the sample at the first
    that overflowed, so one long record crowded out every short one behind it."""
    records = [
        {"text": "L" * 12, "customer_id": "A"},
        {"text": "s1", "customer_id": "A"},
        {"text": "s2", "customer_id": "A"},
        {"text": "s3", "customer_id": "A"},
    ]
    packed = _pack(records, seq_len=9, privacy_unit="customer")  # 10 tokens: three short records (3 each)
    assert packed.record_indices == [[1, 2, 3, 0]]  # the three whole, then the long one in the space left
    short = encode("s1") + [EOS] + encode("s2") + [EOS] + encode("s3") + [EOS]
    assert packed.tokens[0].tolist() == short + encode("L")
