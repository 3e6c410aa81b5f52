"""A synthetic non-IID bank corpus: bank profiles, and each bank's records drawn from Faker.

Banks differ in locale, language, currency, merchant and customer mix, template mix and fraud
rate (the federation demo needs distribution shift). Each record is Faker values poured into
one of a few dozen templates (tables.py), so a small byte-level LM can learn one bank's text.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from fedmoe.fl_client.data.tables import (
    BANK_LOCALES,
    BANK_NAME_PATTERNS,
    DAY_HOURS,
    FRAUD_CATEGORIES,
    KINDS,
    LOCALE_STYLES,
    MERCHANT_CATEGORIES,
    MIXED_TEMPLATES,
    SEGMENT_AMOUNT_SCALE,
    TEMPLATES,
    LocaleStyle,
)
from fedmoe.fl_client.errors import DataError

logger = logging.getLogger(__name__)

_MERCHANTS_PER_CATEGORY = 5
_PAYEES_PER_CUSTOMER = 2


@dataclass(frozen=True)
class BankProfile:
    """What makes one synthetic bank different from the others (all fields are plain data).

    Mixes are (name, weight) pairs; weights need not sum to 1.

    Attributes:
        bank_id: id written into every record ("bank-0", ...), prefix of its customer ids.
        bank_name: display name used in some support messages.
        locale: Faker locale, a key of LOCALE_STYLES (language, date/number format, currency).
        currency: ISO 4217 code of the home currency.
        fraud_rate: probability that a record is fraud-related (`is_fraud`).
        kind_mix: weights of "transaction", "support", "kyc".
        merchant_mix: weights of MERCHANT_CATEGORIES for card/online payments.
        segment_mix: weights of customer segments (RETAIL, STUDENT, PREMIUM, BUSINESS).
        template_mix: weights of the non-fraud templates within each kind (see MIXED_TEMPLATES).
        records_per_customer: mean records per customer (sets the customer pool size).
        foreign_share: probability that a legitimate card/ATM payment is in a foreign currency.
    """

    bank_id: str
    bank_name: str
    locale: str
    currency: str
    fraud_rate: float
    kind_mix: tuple[tuple[str, float], ...]
    merchant_mix: tuple[tuple[str, float], ...]
    segment_mix: tuple[tuple[str, float], ...]
    template_mix: tuple[tuple[str, float], ...]
    records_per_customer: float
    foreign_share: float

    def __post_init__(self) -> None:
        where = f"BankProfile {self.bank_id!r}"
        if not self.bank_id:
            raise DataError("BankProfile.bank_id: expected a non-empty string, got ''")
        if self.locale not in LOCALE_STYLES:
            raise DataError(f"{where}: locale expected one of {sorted(LOCALE_STYLES)}, got {self.locale!r}")
        if not (len(self.currency) == 3 and self.currency.isalpha() and self.currency.isupper()):
            raise DataError(f"{where}: currency expected a 3-letter ISO 4217 code, got {self.currency!r}")
        for name in ("fraud_rate", "foreign_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{where}: {name} expected a probability in [0, 1], got {value}")
        if not self.records_per_customer >= 1.0:
            raise DataError(f"{where}: records_per_customer expected >= 1, got {self.records_per_customer}")
        self._check_mixes(where)

    def _check_mixes(self, where: str) -> None:
        all_templates = [t for names in MIXED_TEMPLATES.values() for t in names]
        for field_name, allowed in (
            ("kind_mix", KINDS),
            ("merchant_mix", tuple(MERCHANT_CATEGORIES)),
            ("segment_mix", tuple(SEGMENT_AMOUNT_SCALE)),
            ("template_mix", all_templates),
        ):
            mix = dict(getattr(self, field_name))
            unknown = sorted(set(mix) - set(allowed))
            if unknown:
                raise DataError(f"{where}: {field_name} has unknown names {unknown}; allowed: {list(allowed)}")
            if any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
                raise DataError(f"{where}: {field_name} expected weights >= 0 with a positive sum, got {mix}")
        templates = dict(self.template_mix)
        for names in MIXED_TEMPLATES.values():
            if not sum(templates.get(t, 0.0) for t in names) > 0:
                raise DataError(f"{where}: template_mix expected a positive weight on one of {list(names)}")


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _dirichlet(rng: random.Random, alphas: Sequence[float], floor: float) -> list[float]:
    """A Dirichlet draw mixed with a uniform floor so that every option keeps some weight."""
    draws = [rng.gammavariate(a, 1.0) for a in alphas]
    total = sum(draws) or 1.0
    k = len(alphas)
    return [round(floor + (1.0 - floor * k) * d / total, 4) for d in draws]


def _faker(locale: str, seed: int) -> Any:
    from faker import Faker  # imported here: loading Faker's locale data costs ~0.1 s

    fake = Faker(locale)
    fake.seed_instance(seed)
    # Some locale providers (it_IT's cities) build their word lists from a set, whose order
    # follows Python's per-process hash seed: the same seed then gave other records in every
    # ClientApp process (and another dataset fingerprint). Sorted, the draws are reproducible.
    for provider in fake.providers:
        for name in ("cities",):
            words = getattr(provider, name, None)
            if isinstance(words, list):
                setattr(provider, name, sorted(words))
    return fake


def make_bank_profiles(n_banks: int, seed: int) -> list[BankProfile]:
    """Draw `n_banks` clearly different bank profiles.

    Banks take the locales of BANK_LOCALES in order (en_US, de_DE, fr_FR, en_GB, es_ES, it_IT,
    nl_NL, de_CH), cycling when there are more banks. Fraud rates are spread geometrically over
    [1%, 12%] and shuffled, so no two banks share one; the mixes are Dirichlet draws.

    Args:
        n_banks: how many banks (>= 1).
        seed: job seed; the same (n_banks, seed) gives the same profiles (the fraud-rate spread
            depends on n_banks, so bank i may differ between federations of different sizes).

    Returns:
        One BankProfile per bank, bank ids "bank-0" .. "bank-{n_banks-1}".

    Raises:
        DataError: n_banks < 1.
    """
    if n_banks < 1:
        raise DataError(f"make_bank_profiles: n_banks expected >= 1, got {n_banks}")
    rng = random.Random(_derive_seed(seed, "bank-profiles"))
    lo, hi = 0.01, 0.12
    if n_banks == 1:
        fraud_rates = [rng.uniform(lo, hi)]
    else:
        fraud_rates = [lo * (hi / lo) ** (i / (n_banks - 1)) for i in range(n_banks)]
        rng.shuffle(fraud_rates)
    categories = list(MERCHANT_CATEGORIES)
    profiles = [_draw_profile(i, seed, fraud_rates[i], categories, rng) for i in range(n_banks)]
    logger.info("made %d bank profiles: %s", n_banks, ", ".join(f"{p.bank_id}={p.locale}" for p in profiles))
    return profiles


def _draw_profile(i: int, seed: int, fraud_rate: float, categories: list[str], rng: random.Random) -> BankProfile:
    """Bank i's profile: locale by position, name from Faker, mixes and rates from `rng`."""
    locale = BANK_LOCALES[i % len(BANK_LOCALES)]
    style = LOCALE_STYLES[locale]
    fake = _faker(locale, _derive_seed(seed, "bank-name", i))
    bank_name = BANK_NAME_PATTERNS[style.lang].format(name=fake.last_name())
    kind_w = _dirichlet(rng, (5.0, 2.0, 1.0), floor=0.05)
    merchant_w = _dirichlet(rng, [0.2 if MERCHANT_CATEGORIES[c].high_risk else 0.8 for c in categories], floor=0.005)
    segment_w = _dirichlet(rng, (1.0,) * len(SEGMENT_AMOUNT_SCALE), floor=0.03)
    template_mix = []
    for names in MIXED_TEMPLATES.values():
        template_mix.extend(zip(names, _dirichlet(rng, (1.2,) * len(names), floor=0.05), strict=True))
    return BankProfile(
        bank_id=f"bank-{i}",
        bank_name=bank_name,
        locale=locale,
        currency=style.currency,
        fraud_rate=round(fraud_rate * rng.uniform(0.95, 1.05), 4),
        kind_mix=tuple(zip(KINDS, kind_w, strict=True)),
        merchant_mix=tuple(zip(categories, merchant_w, strict=True)),
        segment_mix=tuple(zip(SEGMENT_AMOUNT_SCALE, segment_w, strict=True)),
        template_mix=tuple(template_mix),
        records_per_customer=round(rng.uniform(5.0, 30.0), 1),
        foreign_share=round(rng.uniform(0.01, 0.15), 3),
    )


@dataclass(frozen=True)
class _Merchant:
    name: str  # as a customer writes it
    descriptor: str  # as a card statement prints it: upper case, at most 22 characters
    city: str
    web: str
    category: str


@dataclass(frozen=True)
class _Payee:
    name: str
    account: str
    ref: str  # fixed reference prefix of this standing transfer
    amount: float


@dataclass(frozen=True)
class _Customer:
    customer_id: str
    first_name: str
    last_name: str
    city: str
    street: str
    job: str
    employer: str
    dob: str
    last4: str
    segment: str
    activity: float  # relative number of records
    favorites: dict[str, int]  # category -> index of the customer's usual merchant
    payees: tuple[_Payee, ...]


def _account(fake: Any, rng: random.Random, style: LocaleStyle) -> str:
    if style.iban:
        return fake.iban()
    return f"RTN {fake.aba()} ACCT ****{rng.randrange(10_000):04d}"


def _make_customer(
    fake: Any, rng: random.Random, profile: BankProfile, index: int, style: LocaleStyle, start: date
) -> _Customer:
    segments, segment_w = zip(*profile.segment_mix, strict=True)
    segment = rng.choices(segments, segment_w)[0]
    payees = tuple(
        _Payee(
            name=f"{fake.first_name()} {fake.last_name()}".upper(),
            account=_account(fake, rng, style),
            ref=fake.bothify("???").upper(),
            amount=round(math.exp(rng.gauss(math.log(400.0), 0.6)) * SEGMENT_AMOUNT_SCALE[segment], 2),
        )
        for _ in range(_PAYEES_PER_CUSTOMER)
    )
    dob = start - timedelta(days=rng.randrange(18 * 365, 85 * 365))  # not Faker's: it is relative to today
    return _Customer(
        customer_id=f"{profile.bank_id}-c{index:05d}",
        first_name=fake.first_name(),
        last_name=fake.last_name(),
        city=fake.city(),
        street=fake.street_address(),
        job=fake.job(),
        employer=fake.company(),
        dob=dob.strftime(style.date_fmt),
        last4=f"{rng.randrange(10_000):04d}",
        segment=segment,
        activity=math.exp(rng.gauss(0.0, 0.8)),
        favorites={c: rng.randrange(_MERCHANTS_PER_CATEGORY) for c in MERCHANT_CATEGORIES},
        payees=payees,
    )


def _format_amount(value: float, code: str, home: str, style: LocaleStyle, symbol: str) -> str:
    num = f"{value:,.2f}".replace(",", "\x00").replace(".", style.decimal).replace("\x00", style.thousands)
    if code == home:
        return style.home_amount.format(num=num, sym=symbol, code=code)
    return style.foreign_amount.format(num=num, code=code)


def generate_bank_corpus(
    profile: BankProfile, n_records: int, seed: int, *, start_date: date = date(2024, 1, 1), n_days: int = 365
) -> list[dict[str, Any]]:
    """Generate one bank's synthetic records: transaction narratives, support messages, KYC notes.

    Names, cities, streets, companies, jobs, IBANs/routing numbers, web domains and foreign
    currency codes come from a Faker instance in the bank's locale; amounts, dates and choices
    from a seeded RNG. Each customer has usual merchants and standing payees, so their records
    repeat (what customer-level privacy protects).

    Args:
        profile: the bank (see make_bank_profiles).
        n_records: how many records (>= 0).
        seed: the same (profile, n_records, seed) gives identical records.
        start_date, n_days: records are dated in [start_date, start_date + n_days).

    Returns:
        Records as dicts: text (str), customer_id (str, "<bank_id>-c00042"), bank_id (str),
        kind ("transaction" | "support" | "kyc"), is_fraud (bool).

    Raises:
        DataError: n_records < 0 or n_days < 1.
    """
    if n_records < 0:
        raise DataError(f"generate_bank_corpus: n_records expected >= 0, got {n_records}")
    if n_days < 1:
        raise DataError(f"generate_bank_corpus: n_days expected >= 1, got {n_days}")
    fake = _faker(profile.locale, _derive_seed(seed, profile.bank_id, "faker"))
    rng = random.Random(_derive_seed(seed, profile.bank_id, "records"))
    bank = _make_bank(profile, fake, rng, n_records=n_records, start_date=start_date, n_days=n_days)
    kinds, kind_w = zip(*profile.kind_mix, strict=True)
    record_kinds = rng.choices(kinds, kind_w, k=n_records)
    record_customers = rng.choices(bank.customers, [c.activity for c in bank.customers], k=n_records)
    records = [_make_record(bank, kind, cust, rng) for kind, cust in zip(record_kinds, record_customers, strict=True)]
    logger.info(
        "%s: generated %d records for %d customers (%s, fraud rate %.3f)",
        profile.bank_id,
        n_records,
        len(bank.customers),
        profile.locale,
        profile.fraud_rate,
    )
    return records


@dataclass(frozen=True)
class _Bank:
    """What one bank's records are drawn from: its profile, Faker, merchants, customers, calendar."""

    profile: BankProfile
    style: LocaleStyle
    fake: Any
    symbol: str  # of the home currency
    foreign_codes: list[str]
    merchants: dict[str, list[_Merchant]]  # category -> the bank's merchants in it
    customers: list[_Customer]
    dates: list[str]  # day index -> date as the locale writes it
    months: list[int]  # day index -> month
    template_w: dict[str, list[float]]  # kind -> weights of MIXED_TEMPLATES[kind]


def _make_merchants(fake: Any) -> dict[str, list[_Merchant]]:
    """The bank's merchants: _MERCHANTS_PER_CATEGORY per category, all from Faker."""
    merchants: dict[str, list[_Merchant]] = {}
    for category in MERCHANT_CATEGORIES:
        merchants[category] = []
        for _ in range(_MERCHANTS_PER_CATEGORY):
            name = fake.company()
            descriptor = name.upper()[:22].rstrip(" ,.-&")
            merchants[category].append(_Merchant(name, descriptor, fake.city().upper(), fake.domain_name(), category))
    return merchants


def _make_bank(
    profile: BankProfile, fake: Any, rng: random.Random, *, n_records: int, start_date: date, n_days: int
) -> _Bank:
    # Keyword arguments are evaluated in order: Faker and rng draws happen as written.
    style = LOCALE_STYLES[profile.locale]
    n_customers = max(1, math.ceil(n_records / profile.records_per_customer))
    days = [start_date + timedelta(days=d) for d in range(n_days)]
    weights = dict(profile.template_mix)
    return _Bank(
        profile=profile,
        style=style,
        fake=fake,
        symbol=fake.currency_symbol(profile.currency),
        foreign_codes=sorted({s.currency for s in LOCALE_STYLES.values()} - {profile.currency}),
        merchants=_make_merchants(fake),
        customers=[_make_customer(fake, rng, profile, i, style, start_date) for i in range(n_customers)],
        dates=[day.strftime(style.date_fmt) for day in days],
        months=[day.month for day in days],
        template_w={kind: [weights.get(t, 0.0) for t in names] for kind, names in MIXED_TEMPLATES.items()},
    )


@dataclass(frozen=True)
class _Payment:
    """The draws every record starts from, fraud or not: when, where, how much, in what currency."""

    is_fraud: bool
    day: int
    hour: int
    merchant: _Merchant
    code: str  # ISO 4217 currency of the amount
    value: float


def _draw_payment(bank: _Bank, cust: _Customer, rng: random.Random) -> _Payment:
    profile = bank.profile
    is_fraud = rng.random() < profile.fraud_rate
    day = rng.randrange(len(bank.dates))
    if is_fraud:  # at night, at a high-risk merchant, often in a foreign currency
        hour = rng.randrange(6)
        category = rng.choice(FRAUD_CATEGORIES)
        merchant = rng.choice(bank.merchants[category])
        code = bank.fake.currency_code() if rng.random() < 0.6 else profile.currency
        scale = 3.0
    else:
        hour = rng.choices(range(24), DAY_HOURS)[0]
        categories, category_w = zip(*profile.merchant_mix, strict=True)
        category = rng.choices(categories, category_w)[0]
        pool = bank.merchants[category]
        merchant = pool[cust.favorites[category]] if rng.random() < 0.6 else rng.choice(pool)
        code = rng.choice(bank.foreign_codes) if rng.random() < profile.foreign_share else profile.currency
        scale = SEGMENT_AMOUNT_SCALE[cust.segment]
    cat = MERCHANT_CATEGORIES[category]
    value = round(math.exp(rng.gauss(math.log(cat.median), cat.sigma)) * scale, 2)
    return _Payment(is_fraud, day, hour, merchant, code, value)


def _make_record(bank: _Bank, kind: str, cust: _Customer, rng: random.Random) -> dict[str, Any]:
    pay = _draw_payment(bank, cust, rng)
    merchant = pay.merchant
    fields: dict[str, Any] = {
        "date": bank.dates[pay.day],
        "time": f"{pay.hour:02d}:{rng.randrange(60):02d}",
        "merchant": merchant.descriptor,
        "merchant_name": merchant.name,
        "merchant_city": merchant.city,
        "web": merchant.web,
        "mcc": MERCHANT_CATEGORIES[merchant.category].mcc,
        "card": f"****{cust.last4}",
        "last4": cust.last4,
        "first_name": cust.first_name,
        "last_name": cust.last_name,
        "name": f"{cust.first_name} {cust.last_name}",
        "city": cust.city,
        "street": cust.street,
        "bank": bank.profile.bank_name,
        "ticket": f"#{rng.randrange(100_000, 1_000_000)}",
    }
    value, code = pay.value, pay.code
    if kind == "transaction":
        template, value, code = _transaction(bank, cust, pay, fields, rng)
    elif kind == "support":
        template = (
            "sup_fraud" if pay.is_fraud else rng.choices(MIXED_TEMPLATES["support"], bank.template_w["support"])[0]
        )
    else:
        template = "kyc_alert" if pay.is_fraud else "kyc_review"
        fields.update(
            dob=cust.dob, job=cust.job, employer=cust.employer, segment=cust.segment, n_accounts=rng.randint(3, 9)
        )
    fields["amount"] = _format_amount(value, code, bank.profile.currency, bank.style, bank.symbol)
    return {
        "text": TEMPLATES[bank.style.lang][template].format_map(fields),
        "customer_id": cust.customer_id,
        "bank_id": bank.profile.bank_id,
        "kind": kind,
        "is_fraud": pay.is_fraud,
    }


def _transaction(
    bank: _Bank, cust: _Customer, pay: _Payment, fields: dict[str, Any], rng: random.Random
) -> tuple[str, float, str]:
    """A transaction's template; adds its own fields. ATM and transfer amounts replace the drawn one.

    Returns:
        (template name, amount, currency code).
    """
    value, code = pay.value, pay.code
    if pay.is_fraud:
        template = "tx_online" if rng.random() < 0.7 else "tx_card"
    else:
        template = rng.choices(MIXED_TEMPLATES["transaction"], bank.template_w["transaction"])[0]
    if template == "tx_atm":
        value = 20.0 * rng.randint(1, 15) * (2 if cust.segment in ("PREMIUM", "BUSINESS") else 1)
        fields["atm_city"] = cust.city.upper() if code == bank.profile.currency else pay.merchant.city
    elif template == "tx_transfer":
        payee = rng.choice(cust.payees)
        value = payee.amount if rng.random() < 0.7 else value
        code = bank.profile.currency
        month = bank.months[pay.day]
        fields.update(payee=payee.name, account=payee.account, ref=f"{payee.ref}{month:02d}", scheme=bank.style.scheme)
    return template, value, code
