"""A one-language consortium corpus: banks that share a market and differ in their business.

The case the seed describes (beside the 8-locale corpus in synthetic.py, the hard case): every
bank writes card-statement records in one language and one format, from one market of merchants,
but each has its own product mix (channels, merchant categories), customer segments (which set
amounts) and a few rare patterns of its own (in-house merchants, a reference format). One record:

    03-14 card student | WHITBY FOODS | 23.40 | category=groceries

The last field, the merchant's category, is the held-out task (`field_spans`: next-field accuracy
is the share of records whose category the model completes exactly). A merchant's category is
a property of the shared market, so every bank's records teach the same mapping; a bank alone
sees each merchant a few times.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from fedmoe.fl_client.data.synthetic import _derive_seed, _dirichlet
from fedmoe.fl_client.errors import DataError

TASK_FIELD = "category="  # the record's last field: the task the metric scores

# category -> (median amount, words a merchant of that category may carry in its name)
CATEGORIES: dict[str, tuple[float, tuple[str, ...]]] = {
    "groceries": (32.0, ("FOODS", "MARKET", "GROCER", "STORES")),
    "fuel": (55.0, ("PETROL", "FUELS", "SERVICE STN", "GARAGE")),
    "restaurants": (28.0, ("KITCHEN", "GRILL", "BISTRO", "DINER")),
    "travel": (180.0, ("AIRWAYS", "RAIL", "TRAVEL", "COACHES")),
    "utilities": (85.0, ("ENERGY", "WATER", "POWER", "GAS")),
    "telecom": (40.0, ("MOBILE", "TELECOM", "BROADBAND", "NETWORKS")),
    "pharmacy": (18.0, ("CHEMIST", "PHARMACY", "HEALTH", "DRUGSTORE")),
    "clothing": (60.0, ("FASHION", "OUTFITTERS", "APPAREL", "TAILORS")),
    "electronics": (240.0, ("DIGITAL", "ELECTRICAL", "TECH", "COMPUTERS")),
    "entertainment": (22.0, ("CINEMA", "STREAMING", "ARCADE", "TICKETS")),
    "insurance": (70.0, ("INSURANCE", "ASSURANCE", "COVER", "MUTUAL")),
    "education": (120.0, ("ACADEMY", "COLLEGE", "TUITION", "BOOKS")),
}
CHANNELS: tuple[str, ...] = ("card", "online", "contactless", "debit", "standing")
SEGMENTS: dict[str, float] = {"student": 0.4, "retail": 1.0, "premier": 2.5, "business": 4.0, "senior": 0.8}
_SURNAMES: tuple[str, ...] = (
    "ASHDOWN", "BRAMLEY", "CALDER", "DENHOLM", "ELWOOD", "FAIRLIE", "GARSTON", "HOLBROOK", "IVERSON", "JARROW",
    "KELSO", "LANGLEY", "MARLOW", "NEWBOLD", "OAKHAM", "PENRITH", "QUORN", "RADLEY", "SELBY", "THORNE",
    "UPTON", "VERNON", "WHITBY", "YARDLEY",
)  # fmt: skip
_MERCHANTS_PER_CATEGORY = 10
_OWN_MERCHANTS = 3  # rare, bank-specific
_OWN_SHARE = 0.06  # of a bank's records at its own merchants


@dataclass(frozen=True)
class Merchant:
    name: str
    category: str


@dataclass(frozen=True)
class ConsortiumBank:
    """One bank of the consortium: its mixes (name, weight) and its own rare patterns."""

    bank_id: str
    channel_mix: tuple[tuple[str, float], ...]
    category_mix: tuple[tuple[str, float], ...]
    segment_mix: tuple[tuple[str, float], ...]
    own_merchants: tuple[Merchant, ...]
    reference_prefix: str  # standing orders carry "ref <prefix>-<4 digits>"


def market(seed: int) -> dict[str, list[Merchant]]:
    """The merchants every bank's customers buy from: _MERCHANTS_PER_CATEGORY per category."""
    rng = random.Random(_derive_seed(seed, "consortium-market"))
    out: dict[str, list[Merchant]] = {}
    for category, (_, words) in CATEGORIES.items():
        out[category] = [
            Merchant(f"{rng.choice(_SURNAMES)} {rng.choice(words)}", category) for _ in range(_MERCHANTS_PER_CATEGORY)
        ]
    return out


def make_consortium(n_banks: int, seed: int) -> list[ConsortiumBank]:
    """`n_banks` banks of one market; bank i is the same whatever n_banks (drawn from its own stream).

    Raises:
        DataError: n_banks < 1.
    """
    if n_banks < 1:
        raise DataError(f"make_consortium: n_banks expected >= 1, got {n_banks}")
    return [_draw_bank(i, seed) for i in range(n_banks)]


def _draw_bank(i: int, seed: int) -> ConsortiumBank:
    rng = random.Random(_derive_seed(seed, "consortium-bank", i))
    categories = list(CATEGORIES)
    own = tuple(
        Merchant(f"BANK{i} {rng.choice(('HOME', 'CARD', 'LIFE', 'TRADE'))} {rng.choice(words)}", cat)
        for cat, (_, words) in ((c, CATEGORIES[c]) for c in rng.sample(categories, _OWN_MERCHANTS))
    )
    return ConsortiumBank(
        bank_id=f"bank-{i}",
        channel_mix=tuple(zip(CHANNELS, _dirichlet(rng, (1.0,) * len(CHANNELS), floor=0.03), strict=True)),
        category_mix=tuple(zip(categories, _dirichlet(rng, (0.7,) * len(categories), floor=0.01), strict=True)),
        segment_mix=tuple(zip(SEGMENTS, _dirichlet(rng, (0.8,) * len(SEGMENTS), floor=0.02), strict=True)),
        own_merchants=own,
        reference_prefix="".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3)),
    )


def generate_consortium_corpus(bank: ConsortiumBank, n_records: int, seed: int) -> list[dict[str, Any]]:
    """`n_records` of one bank: dicts with text, customer_id, bank_id, kind "transaction", category.

    Raises:
        DataError: n_records < 0.
    """
    if n_records < 0:
        raise DataError(f"generate_consortium_corpus: n_records expected >= 0, got {n_records}")
    merchants = market(seed)
    rng = random.Random(_derive_seed(seed, bank.bank_id, "consortium-records"))
    n_customers = max(1, n_records // 8)
    segments = rng.choices(*zip(*bank.segment_mix, strict=True), k=n_customers)
    return [_record(bank, merchants, rng, rng.randrange(n_customers), segments) for _ in range(n_records)]


def _record(
    bank: ConsortiumBank, merchants: dict[str, list[Merchant]], rng: random.Random, customer: int, segments: list[str]
) -> dict[str, Any]:
    segment = segments[customer]
    channel = rng.choices(*zip(*bank.channel_mix, strict=True))[0]
    if rng.random() < _OWN_SHARE:
        merchant = rng.choice(bank.own_merchants)
    else:
        category = rng.choices(*zip(*bank.category_mix, strict=True))[0]
        merchant = rng.choice(merchants[category])
    median = CATEGORIES[merchant.category][0] * SEGMENTS[segment]
    amount = round(median * rng.lognormvariate(0.0, 0.5), 2)
    day = date(2024, 1, 1) + timedelta(days=rng.randrange(366))
    ref = f" ref {bank.reference_prefix}-{rng.randrange(10_000):04d}" if channel == "standing" else ""
    text = f"{day:%m-%d} {channel} {segment}{ref} | {merchant.name} | {amount:.2f} | {TASK_FIELD}{merchant.category}"
    return {
        "text": text,
        "customer_id": f"{bank.bank_id}-c{customer:05d}",
        "bank_id": bank.bank_id,
        "kind": "transaction",
        "category": merchant.category,
    }


def field_spans(records: Sequence[dict[str, Any]], encode: Callable[[str], list[int]]) -> list[tuple[int, int]]:
    """Per record, the token positions [start, end) of its task field's value in its encoding.

    With one record per sample (pack mode per_record), target position j predicts token j + 1, so the
    value is predicted at target positions start - 1 .. end - 2.

    Raises:
        DataError: a record without the task field, or a tokenizer whose encoding of the prefix is
            not a prefix of the record's (the span would not be where the metric looks).
    """
    spans = []
    for i, record in enumerate(records):
        text = record["text"]
        at = text.rfind(TASK_FIELD)
        if at < 0:
            raise DataError(f"field_spans: record {i} has no {TASK_FIELD!r} field, got {text[:60]!r}")
        prefix, full = encode(text[: at + len(TASK_FIELD)]), encode(text)
        if full[: len(prefix)] != prefix:
            raise DataError(f"field_spans: record {i}: the tokenizer does not encode the prefix as a prefix")
        spans.append((len(prefix), len(full)))
    return spans
