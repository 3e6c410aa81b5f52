"""One bank's text data: a synthetic non-IID corpus, file loading, train/eval split, packing.

Four steps, in the order a bank uses them:
1. `make_bank_profiles` + `generate_bank_corpus`: synthetic banks that differ in locale, language,
   currency, merchant and customer mix, template mix and fraud rate (the federation demo needs
   distribution shift), each built from Faker values poured into a few dozen templates, so a
   small byte-level LM can learn one bank's text. Or `load_text_file`: a bank's own JSONL, CSV
   or Parquet file with a `text` column and an optional `customer_id` column.
2. `train_eval_split`: deterministic by seed; by customer when the customer is the privacy unit.
3. `pack_records`: token ids -> fixed-length samples. What one sample holds decides what DP-SGD
   protects: one record (record-level DP) or all of one customer's rows (customer-level DP).

Shape legend: n = samples, L = seq_len; `tokens` is (n, L+1), `inputs`/`targets` are (n, L).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fl_client.errors import DataError
from fl_client.state import atomic_write_bytes

logger = logging.getLogger(__name__)

Kind = Literal["transaction", "support", "kyc"]
PrivacyUnit = Literal["record", "customer"]
PackMode = Literal["concat", "per_record"]

KINDS: tuple[str, ...] = ("transaction", "support", "kyc")
PRIVACY_UNITS: tuple[str, ...] = ("record", "customer")
PACK_MODES: tuple[str, ...] = ("concat", "per_record")
IGNORE_INDEX = -100  # target value that lm_loss / cross_entropy skip

# ---------------------------------------------------------------------------------------------
# Corpus tables: how each locale writes dates and amounts, its templates, merchant categories.
# Values (names, cities, companies, jobs, IBANs, domains, foreign currencies) come from Faker.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocaleStyle:
    """How a bank in one locale writes: template language, currency, date and number formats."""

    lang: str  # key into TEMPLATES
    currency: str  # ISO 4217 code of the home currency
    date_fmt: str  # strftime pattern
    thousands: str
    decimal: str
    home_amount: str  # pattern with {num}, {sym}, {code} for amounts in the home currency
    foreign_amount: str  # pattern with {num}, {code} for amounts in another currency
    scheme: str  # domestic transfer scheme named in transfer narratives
    iban: bool  # False: accounts are routing + account numbers (US)


LOCALE_STYLES: dict[str, LocaleStyle] = {
    "en_US": LocaleStyle("en", "USD", "%m/%d/%Y", ",", ".", "{sym}{num}", "{num} {code}", "ACH", iban=False),
    "de_DE": LocaleStyle("de", "EUR", "%d.%m.%Y", ".", ",", "{num} {code}", "{num} {code}", "SEPA", iban=True),
    "fr_FR": LocaleStyle("fr", "EUR", "%d/%m/%Y", " ", ",", "{num} {code}", "{num} {code}", "SEPA", iban=True),
    "en_GB": LocaleStyle("en", "GBP", "%d/%m/%Y", ",", ".", "{sym}{num}", "{num} {code}", "FPS", iban=True),
    "es_ES": LocaleStyle("es", "EUR", "%d/%m/%Y", ".", ",", "{num} {code}", "{num} {code}", "SEPA", iban=True),
    "it_IT": LocaleStyle("it", "EUR", "%d/%m/%Y", ".", ",", "{num} {code}", "{num} {code}", "SEPA", iban=True),
    "nl_NL": LocaleStyle("nl", "EUR", "%d-%m-%Y", ".", ",", "{code} {num}", "{code} {num}", "SEPA", iban=True),
    "de_CH": LocaleStyle("de", "CHF", "%d.%m.%Y", "'", ".", "{code} {num}", "{code} {num}", "SIC", iban=True),
}
BANK_LOCALES: tuple[str, ...] = tuple(LOCALE_STYLES)  # make_bank_profiles cycles through these in order

# Bank names: Faker last name in a per-language pattern (Faker's bank() names real banks, and
# exists for few locales).
BANK_NAME_PATTERNS: dict[str, str] = {
    "en": "{name} Bank",
    "de": "Bankhaus {name}",
    "fr": "Banque {name}",
    "es": "Banco {name}",
    "it": "Banca {name}",
    "nl": "{name} Bank",
}

# Nine templates per language (54 in all). Transactions look like statement narratives, support
# and KYC like short free text. Fraud records use tx_online/tx_card with fraud-typical values
# (night time, high-risk merchant, often a foreign currency), sup_fraud and kyc_alert.
TEMPLATES: dict[str, dict[str, str]] = {
    "en": {
        "tx_card": "CARD PAYMENT {merchant} {merchant_city} {date} {time} {amount} CARD {card} MCC {mcc}",
        "tx_online": "ONLINE PURCHASE {merchant} {web} {date} {time} {amount} CARD {card} CNP",
        "tx_atm": "ATM WITHDRAWAL {atm_city} {date} {time} {amount} CARD {card}",
        "tx_transfer": "{scheme} TRANSFER TO {payee} {account} REF {ref} {date} {amount}",
        "sup_card": (
            "Hi, this is {first_name} {last_name}. My card ending {last4} was declined at {merchant_name} "
            "on {date} for {amount}. Can you check what happened? Ticket {ticket}."
        ),
        "sup_general": (
            "Dear {bank}, I moved to {street}, {city}. Please update the address on my account and send "
            "my statements there. Thanks, {first_name}. Ticket {ticket}."
        ),
        "sup_fraud": (
            "URGENT: I did not make the payment of {amount} to {merchant_name} on {date} at {time}. Please "
            "block my card ending {last4} and refund me. {first_name} {last_name}, ticket {ticket}."
        ),
        "kyc_review": (
            "KYC review {date}: {name}, born {dob}, {job} at {employer}, lives in {city}. ID document "
            "verified, source of funds: salary. Segment {segment}. Risk: low."
        ),
        "kyc_alert": (
            "KYC alert {date}: {name}, born {dob}. ID document does not match the photo; address in {city} "
            "not confirmed; {n_accounts} accounts opened in 30 days. Risk: high, escalated to compliance."
        ),
    },
    "de": {
        "tx_card": "KARTENZAHLUNG {merchant} {merchant_city} {date} {time} {amount} KARTE {card} MCC {mcc}",
        "tx_online": "ONLINE-KAUF {merchant} {web} {date} {time} {amount} KARTE {card} CNP",
        "tx_atm": "BARGELDAUSZAHLUNG GA {atm_city} {date} {time} {amount} KARTE {card}",
        "tx_transfer": "{scheme}-UEBERWEISUNG AN {payee} {account} VWZ {ref} {date} {amount}",
        "sup_card": (
            "Guten Tag, hier ist {first_name} {last_name}. Meine Karte mit Endziffern {last4} wurde am {date} "
            "bei {merchant_name} über {amount} abgelehnt. Können Sie das prüfen? Ticket {ticket}."
        ),
        "sup_general": (
            "Hallo Team von {bank}, ich bin umgezogen: {street}, {city}. Bitte ändern Sie die Adresse meines "
            "Kontos und senden Sie die Kontoauszüge dorthin. Danke, {first_name}. Ticket {ticket}."
        ),
        "sup_fraud": (
            "DRINGEND: Die Zahlung von {amount} an {merchant_name} am {date} um {time} habe ich nicht getätigt. "
            "Bitte sperren Sie die Karte mit Endziffern {last4} und erstatten Sie den Betrag. "
            "{first_name} {last_name}, Ticket {ticket}."
        ),
        "kyc_review": (
            "KYC-Prüfung {date}: {name}, geb. {dob}, {job} bei {employer}, wohnhaft in {city}. Ausweis geprüft, "
            "Mittelherkunft: Gehalt. Segment {segment}. Risiko: niedrig."
        ),
        "kyc_alert": (
            "KYC-Warnung {date}: {name}, geb. {dob}. Ausweis passt nicht zum Foto; Adresse in {city} nicht "
            "bestätigt; {n_accounts} Konten in 30 Tagen eröffnet. Risiko: hoch, an Compliance eskaliert."
        ),
    },
    "fr": {
        "tx_card": "PAIEMENT CB {merchant} {merchant_city} {date} {time} {amount} CARTE {card} MCC {mcc}",
        "tx_online": "ACHAT EN LIGNE {merchant} {web} {date} {time} {amount} CARTE {card} VAD",
        "tx_atm": "RETRAIT DAB {atm_city} {date} {time} {amount} CARTE {card}",
        "tx_transfer": "VIREMENT {scheme} VERS {payee} {account} REF {ref} {date} {amount}",
        "sup_card": (
            "Bonjour, je suis {first_name} {last_name}. Ma carte se terminant par {last4} a été refusée chez "
            "{merchant_name} le {date} pour {amount}. Pouvez-vous vérifier ? Ticket {ticket}."
        ),
        "sup_general": (
            "Madame, Monsieur, j'ai déménagé au {street}, {city}. Merci à {bank} de mettre à jour l'adresse "
            "de mon compte et d'y envoyer mes relevés. Cordialement, {first_name}. Ticket {ticket}."
        ),
        "sup_fraud": (
            "URGENT : je n'ai pas effectué le paiement de {amount} à {merchant_name} le {date} à {time}. Merci "
            "de bloquer ma carte se terminant par {last4} et de me rembourser. {first_name} {last_name}, "
            "ticket {ticket}."
        ),
        "kyc_review": (
            "Revue KYC {date} : {name}, né(e) le {dob}, {job} chez {employer}, domicilié(e) à {city}. Pièce "
            "d'identité vérifiée, origine des fonds : salaire. Segment {segment}. Risque : faible."
        ),
        "kyc_alert": (
            "Alerte KYC {date} : {name}, né(e) le {dob}. La pièce d'identité ne correspond pas à la photo ; "
            "adresse à {city} non confirmée ; {n_accounts} comptes ouverts en 30 jours. Risque : élevé, "
            "transmis à la conformité."
        ),
    },
    "es": {
        "tx_card": "PAGO CON TARJETA {merchant} {merchant_city} {date} {time} {amount} TARJETA {card} MCC {mcc}",
        "tx_online": "COMPRA ONLINE {merchant} {web} {date} {time} {amount} TARJETA {card} CNP",
        "tx_atm": "REINTEGRO CAJERO {atm_city} {date} {time} {amount} TARJETA {card}",
        "tx_transfer": "TRANSFERENCIA {scheme} A {payee} {account} CONCEPTO {ref} {date} {amount}",
        "sup_card": (
            "Hola, soy {first_name} {last_name}. Mi tarjeta terminada en {last4} fue rechazada en "
            "{merchant_name} el {date} por {amount}. ¿Pueden revisarlo? Ticket {ticket}."
        ),
        "sup_general": (
            "Estimado {bank}, me he mudado a {street}, {city}. Por favor actualicen la dirección de mi cuenta "
            "y envíen allí mis extractos. Gracias, {first_name}. Ticket {ticket}."
        ),
        "sup_fraud": (
            "URGENTE: no he realizado el pago de {amount} a {merchant_name} el {date} a las {time}. Bloqueen mi "
            "tarjeta terminada en {last4} y devuélvanme el importe. {first_name} {last_name}, ticket {ticket}."
        ),
        "kyc_review": (
            "Revisión KYC {date}: {name}, nacido/a el {dob}, {job} en {employer}, reside en {city}. Documento "
            "de identidad verificado, origen de fondos: nómina. Segmento {segment}. Riesgo: bajo."
        ),
        "kyc_alert": (
            "Alerta KYC {date}: {name}, nacido/a el {dob}. El documento no coincide con la foto; dirección en "
            "{city} no confirmada; {n_accounts} cuentas abiertas en 30 días. Riesgo: alto, escalado a "
            "cumplimiento."
        ),
    },
    "it": {
        "tx_card": "PAGAMENTO POS {merchant} {merchant_city} {date} {time} {amount} CARTA {card} MCC {mcc}",
        "tx_online": "ACQUISTO ONLINE {merchant} {web} {date} {time} {amount} CARTA {card} CNP",
        "tx_atm": "PRELIEVO BANCOMAT {atm_city} {date} {time} {amount} CARTA {card}",
        "tx_transfer": "BONIFICO {scheme} A FAVORE DI {payee} {account} CAUSALE {ref} {date} {amount}",
        "sup_card": (
            "Buongiorno, sono {first_name} {last_name}. La mia carta che termina con {last4} è stata rifiutata "
            "da {merchant_name} il {date} per {amount}. Potete verificare? Ticket {ticket}."
        ),
        "sup_general": (
            "Spettabile {bank}, mi sono trasferito in {street}, {city}. Vi prego di aggiornare l'indirizzo del "
            "mio conto e di inviare lì gli estratti conto. Grazie, {first_name}. Ticket {ticket}."
        ),
        "sup_fraud": (
            "URGENTE: non ho effettuato il pagamento di {amount} a {merchant_name} il {date} alle {time}. "
            "Bloccate la carta che termina con {last4} e rimborsatemi. {first_name} {last_name}, ticket {ticket}."
        ),
        "kyc_review": (
            "Verifica KYC {date}: {name}, nato/a il {dob}, {job} presso {employer}, residente a {city}. "
            "Documento verificato, origine dei fondi: stipendio. Segmento {segment}. Rischio: basso."
        ),
        "kyc_alert": (
            "Allerta KYC {date}: {name}, nato/a il {dob}. Il documento non corrisponde alla foto; indirizzo a "
            "{city} non confermato; {n_accounts} conti aperti in 30 giorni. Rischio: alto, segnalato alla "
            "compliance."
        ),
    },
    "nl": {
        "tx_card": "BETAALAUTOMAAT {merchant} {merchant_city} {date} {time} {amount} PAS {card} MCC {mcc}",
        "tx_online": "ONLINE AANKOOP {merchant} {web} {date} {time} {amount} PAS {card} CNP",
        "tx_atm": "GELDAUTOMAAT {atm_city} {date} {time} {amount} PAS {card}",
        "tx_transfer": "{scheme} OVERBOEKING NAAR {payee} {account} OMSCHRIJVING {ref} {date} {amount}",
        "sup_card": (
            "Hallo, met {first_name} {last_name}. Mijn pas eindigend op {last4} werd op {date} geweigerd bij "
            "{merchant_name} voor {amount}. Kunt u dit nakijken? Ticket {ticket}."
        ),
        "sup_general": (
            "Beste {bank}, ik ben verhuisd naar {street}, {city}. Wilt u het adres van mijn rekening aanpassen "
            "en mijn afschriften daarheen sturen? Bedankt, {first_name}. Ticket {ticket}."
        ),
        "sup_fraud": (
            "DRINGEND: ik heb de betaling van {amount} aan {merchant_name} op {date} om {time} niet gedaan. "
            "Blokkeer mijn pas eindigend op {last4} en betaal mij terug. {first_name} {last_name}, "
            "ticket {ticket}."
        ),
        "kyc_review": (
            "KYC-controle {date}: {name}, geboren {dob}, {job} bij {employer}, woont in {city}. "
            "Identiteitsbewijs gecontroleerd, herkomst van middelen: salaris. Segment {segment}. Risico: laag."
        ),
        "kyc_alert": (
            "KYC-melding {date}: {name}, geboren {dob}. Identiteitsbewijs komt niet overeen met de foto; adres "
            "in {city} niet bevestigd; {n_accounts} rekeningen geopend in 30 dagen. Risico: hoog, doorgezet "
            "naar compliance."
        ),
    },
}

# Templates a bank mixes for its non-fraud records, by kind (KYC has one, so no mix).
MIXED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "transaction": ("tx_card", "tx_online", "tx_atm", "tx_transfer"),
    "support": ("sup_card", "sup_general"),
}


@dataclass(frozen=True)
class MerchantCategory:
    mcc: str  # ISO 18245 merchant category code, printed in card narratives
    median: float  # median amount in the home currency
    sigma: float  # log-normal spread of amounts
    high_risk: bool  # where fraudsters cash out; rare in a bank's normal mix


MERCHANT_CATEGORIES: dict[str, MerchantCategory] = {
    "groceries": MerchantCategory("5411", 45.0, 0.6, False),
    "restaurants": MerchantCategory("5812", 30.0, 0.6, False),
    "fuel": MerchantCategory("5541", 55.0, 0.4, False),
    "pharmacy": MerchantCategory("5912", 20.0, 0.7, False),
    "clothing": MerchantCategory("5651", 70.0, 0.7, False),
    "electronics": MerchantCategory("5732", 250.0, 0.9, False),
    "airlines": MerchantCategory("4511", 400.0, 0.7, False),
    "hotels": MerchantCategory("7011", 180.0, 0.6, False),
    "utilities": MerchantCategory("4900", 90.0, 0.4, False),
    "digital_media": MerchantCategory("5815", 15.0, 0.5, False),
    "gambling": MerchantCategory("7995", 100.0, 1.0, True),
    "crypto": MerchantCategory("6051", 300.0, 1.0, True),
    "gift_cards": MerchantCategory("5947", 150.0, 0.8, True),
    "money_transfer": MerchantCategory("4829", 500.0, 0.9, True),
}
FRAUD_CATEGORIES: tuple[str, ...] = ("electronics", "gambling", "crypto", "gift_cards", "money_transfer")

# Customer segments: printed in KYC notes, scale amounts.
SEGMENT_AMOUNT_SCALE: dict[str, float] = {"RETAIL": 1.0, "STUDENT": 0.5, "PREMIUM": 2.5, "BUSINESS": 4.0}

# Relative frequency of each hour of the day for legitimate activity (fraud: 00-05).
_DAY_HOURS: tuple[float, ...] = (1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 3, 5, 6, 6, 7, 8, 7, 6, 6, 7, 8, 8, 7, 5, 4, 3, 2)
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
    profiles = []
    for i in range(n_banks):
        locale = BANK_LOCALES[i % len(BANK_LOCALES)]
        style = LOCALE_STYLES[locale]
        fake = _faker(locale, _derive_seed(seed, "bank-name", i))
        bank_name = BANK_NAME_PATTERNS[style.lang].format(name=fake.last_name())
        kind_w = _dirichlet(rng, (5.0, 2.0, 1.0), floor=0.05)
        merchant_w = _dirichlet(
            rng, [0.2 if MERCHANT_CATEGORIES[c].high_risk else 0.8 for c in categories], floor=0.005
        )
        segment_w = _dirichlet(rng, (1.0,) * len(SEGMENT_AMOUNT_SCALE), floor=0.03)
        template_mix = []
        for names in MIXED_TEMPLATES.values():
            template_mix.extend(zip(names, _dirichlet(rng, (1.2,) * len(names), floor=0.05), strict=True))
        profiles.append(
            BankProfile(
                bank_id=f"bank-{i}",
                bank_name=bank_name,
                locale=locale,
                currency=style.currency,
                fraud_rate=round(fraud_rates[i] * rng.uniform(0.95, 1.05), 4),
                kind_mix=tuple(zip(KINDS, kind_w, strict=True)),
                merchant_mix=tuple(zip(categories, merchant_w, strict=True)),
                segment_mix=tuple(zip(SEGMENT_AMOUNT_SCALE, segment_w, strict=True)),
                template_mix=tuple(template_mix),
                records_per_customer=round(rng.uniform(5.0, 30.0), 1),
                foreign_share=round(rng.uniform(0.01, 0.15), 3),
            )
        )
    logger.info("made %d bank profiles: %s", n_banks, ", ".join(f"{p.bank_id}={p.locale}" for p in profiles))
    return profiles


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
    style = LOCALE_STYLES[profile.locale]
    templates = TEMPLATES[style.lang]
    fake = _faker(profile.locale, _derive_seed(seed, profile.bank_id, "faker"))
    rng = random.Random(_derive_seed(seed, profile.bank_id, "records"))
    symbol = fake.currency_symbol(profile.currency)
    foreign_codes = sorted({s.currency for s in LOCALE_STYLES.values()} - {profile.currency})

    merchants: dict[str, list[_Merchant]] = {}
    for category in MERCHANT_CATEGORIES:
        merchants[category] = []
        for _ in range(_MERCHANTS_PER_CATEGORY):
            name = fake.company()
            descriptor = name.upper()[:22].rstrip(" ,.-&")
            merchants[category].append(_Merchant(name, descriptor, fake.city().upper(), fake.domain_name(), category))
    n_customers = max(1, math.ceil(n_records / profile.records_per_customer))
    customers = [_make_customer(fake, rng, profile, i, style, start_date) for i in range(n_customers)]

    dates = [(start_date + timedelta(days=d)).strftime(style.date_fmt) for d in range(n_days)]
    months = [(start_date + timedelta(days=d)).month for d in range(n_days)]
    kinds, kind_w = zip(*profile.kind_mix, strict=True)
    categories, category_w = zip(*profile.merchant_mix, strict=True)
    template_w = dict(profile.template_mix)
    tx_names = MIXED_TEMPLATES["transaction"]
    tx_w = [template_w.get(t, 0.0) for t in tx_names]
    sup_names = MIXED_TEMPLATES["support"]
    sup_w = [template_w.get(t, 0.0) for t in sup_names]

    record_kinds = rng.choices(kinds, kind_w, k=n_records)
    record_customers = rng.choices(customers, [c.activity for c in customers], k=n_records)
    records: list[dict[str, Any]] = []
    for kind, cust in zip(record_kinds, record_customers, strict=True):
        is_fraud = rng.random() < profile.fraud_rate
        day = rng.randrange(n_days)
        if is_fraud:
            hour = rng.randrange(6)
            category = rng.choice(FRAUD_CATEGORIES)
            merchant = rng.choice(merchants[category])
            code = fake.currency_code() if rng.random() < 0.6 else profile.currency
            scale = 3.0
        else:
            hour = rng.choices(range(24), _DAY_HOURS)[0]
            category = rng.choices(categories, category_w)[0]
            pool = merchants[category]
            merchant = pool[cust.favorites[category]] if rng.random() < 0.6 else rng.choice(pool)
            code = rng.choice(foreign_codes) if rng.random() < profile.foreign_share else profile.currency
            scale = SEGMENT_AMOUNT_SCALE[cust.segment]
        cat = MERCHANT_CATEGORIES[category]
        value = round(math.exp(rng.gauss(math.log(cat.median), cat.sigma)) * scale, 2)
        fields: dict[str, Any] = {
            "date": dates[day],
            "time": f"{hour:02d}:{rng.randrange(60):02d}",
            "merchant": merchant.descriptor,
            "merchant_name": merchant.name,
            "merchant_city": merchant.city,
            "web": merchant.web,
            "mcc": cat.mcc,
            "card": f"****{cust.last4}",
            "last4": cust.last4,
            "first_name": cust.first_name,
            "last_name": cust.last_name,
            "name": f"{cust.first_name} {cust.last_name}",
            "city": cust.city,
            "street": cust.street,
            "bank": profile.bank_name,
            "ticket": f"#{rng.randrange(100_000, 1_000_000)}",
        }
        if kind == "transaction":
            if is_fraud:
                template = "tx_online" if rng.random() < 0.7 else "tx_card"
            else:
                template = rng.choices(tx_names, tx_w)[0]
            if template == "tx_atm":
                value = 20.0 * rng.randint(1, 15) * (2 if cust.segment in ("PREMIUM", "BUSINESS") else 1)
                fields["atm_city"] = cust.city.upper() if code == profile.currency else merchant.city
            elif template == "tx_transfer":
                payee = rng.choice(cust.payees)
                value = payee.amount if rng.random() < 0.7 else value
                code = profile.currency
                fields.update(
                    payee=payee.name, account=payee.account, ref=f"{payee.ref}{months[day]:02d}", scheme=style.scheme
                )
        elif kind == "support":
            template = "sup_fraud" if is_fraud else rng.choices(sup_names, sup_w)[0]
        else:
            template = "kyc_alert" if is_fraud else "kyc_review"
            fields.update(
                dob=cust.dob, job=cust.job, employer=cust.employer, segment=cust.segment, n_accounts=rng.randint(3, 9)
            )
        fields["amount"] = _format_amount(value, code, profile.currency, style, symbol)
        records.append(
            {
                "text": templates[template].format_map(fields),
                "customer_id": cust.customer_id,
                "bank_id": profile.bank_id,
                "kind": kind,
                "is_fraud": is_fraud,
            }
        )
    logger.info(
        "%s: generated %d records for %d customers (%s, fraud rate %.3f)",
        profile.bank_id,
        n_records,
        n_customers,
        profile.locale,
        profile.fraud_rate,
    )
    return records


# ---------------------------------------------------------------------------------------------
# Loading a bank's own file
# ---------------------------------------------------------------------------------------------

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv", ".parquet")
_EXPECTED_COLUMNS = "a 'text' column (non-empty strings) and optionally 'customer_id'"


def _json_type(value: object) -> str:
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


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _got(value: object) -> str:
    return "null" if value is None else f"{_json_type(value)} {_short(value)}"


def _check_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}, field 'text': expected a non-empty string, got {_got(value)}")
    if not value.strip():
        raise DataError(f"{where}, field 'text': expected a non-empty string, got {_short(value)}")
    return value


def _check_customer_id(value: object, where: str) -> str:
    # Integer ids are common in bank exports; they become strings. Anything else is ambiguous.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}, field 'customer_id': expected a non-empty string or integer, got {_got(value)}")
    return value


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
                raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}")
            if "text" not in obj:
                raise DataError(f"{where}: missing field 'text'; expected {_EXPECTED_COLUMNS}, got keys {sorted(obj)}")
            record = {"text": _check_text(obj["text"], where)}
            if has_customer is None:
                has_customer, first_line = "customer_id" in obj, line_no
            if has_customer != ("customer_id" in obj):
                raise DataError(
                    f"{where}: field 'customer_id' expected in every record or in none (line {first_line} "
                    f"{'has' if has_customer else 'lacks'} it), "
                    f"got a record that {'lacks' if has_customer else 'has'} it"
                )
            if has_customer:
                record["customer_id"] = _check_customer_id(obj["customer_id"], where)
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
        record = {"text": _check_text(row[text_col], where)}
        if cid_col is not None:
            record["customer_id"] = _check_customer_id(row[cid_col], where)
        records.append(record)
    return records


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: expected a Parquet file, got one pyarrow cannot read ({err})") from None
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
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: expected a readable Parquet file, got an error ({err})") from None

    def values(name: str) -> list[Any]:
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

    texts = values("text")
    ids = values("customer_id") if "customer_id" in columns else None
    records: list[dict[str, Any]] = []
    for row, text in enumerate(texts):
        where = f"{path}, row {row} (0-based)"
        record = {"text": _check_text(text, where)}
        if ids is not None:
            record["customer_id"] = _check_customer_id(ids[row], where)
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
    """Write records as UTF-8 JSON lines, atomically (temp file, fsync, rename); returns the path."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return atomic_write_bytes(Path(path), lines.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Train/eval split
# ---------------------------------------------------------------------------------------------


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise DataError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def _customer_ids(records: Sequence[dict[str, Any]]) -> list[str]:
    ids = []
    for i, record in enumerate(records):
        cid = record.get("customer_id")
        if not isinstance(cid, str) or not cid:
            raise DataError(
                f"record {i}: privacy_unit='customer' needs a non-empty string 'customer_id', got {_got(cid)}"
            )
        ids.append(cid)
    return ids


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
    _check_choice("train_eval_split: privacy_unit", privacy_unit, PRIVACY_UNITS)
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"train_eval_split: eval_fraction expected in [0, 1), got {eval_fraction}")
    keys = _customer_ids(records) if privacy_unit == "customer" else [str(i) for i in range(len(records))]
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


# ---------------------------------------------------------------------------------------------
# Packing into fixed-length samples
# ---------------------------------------------------------------------------------------------


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
    - privacy_unit="customer" (mode None or "concat"): all of one customer's records, in input
      order, concatenated into one sample and truncated: a sample is a customer.

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
    _check_choice("pack_records: privacy_unit", privacy_unit, PRIVACY_UNITS)
    if mode is not None:
        _check_choice("pack_records: mode", mode, PACK_MODES)
    if privacy_unit == "customer" and mode == "per_record":
        raise DataError(
            "pack_records: mode expected None or 'concat' with privacy_unit='customer' "
            "(a sample holds all of a customer's records), got 'per_record'"
        )
    if seq_len < 1:
        raise DataError(f"pack_records: seq_len expected >= 1, got {seq_len}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"pack_records: {name} expected an integer >= 0, got {_short(value)}")
    if not records:
        raise DataError("pack_records: expected at least one record, got none")
    mode = mode or ("per_record" if privacy_unit == "record" else "concat")
    width = seq_len + 1

    encoded: list[list[int]] = []
    for i, record in enumerate(records):
        ids = list(encode(_check_text(record.get("text"), f"record {i}")))
        if not ids:
            raise DataError(f"record {i}, field 'text': expected text that encodes to >= 1 token, got none")
        encoded.append(ids + [eos_id])

    seqs: list[list[int]] = []
    members: list[list[int]] = []
    unit_ids: list[str] = []
    if privacy_unit == "customer":
        by_customer: dict[str, list[int]] = {}
        for i, cid in enumerate(_customer_ids(records)):
            by_customer.setdefault(cid, []).append(i)
        for cid, idxs in by_customer.items():
            seq: list[int] = []
            included = []
            for i in idxs:
                if len(seq) >= width:
                    break
                seq.extend(encoded[i])
                included.append(i)
            seqs.append(seq)
            members.append(included)
            unit_ids.append(cid)
    elif mode == "per_record":
        seqs = encoded
        members = [[i] for i in range(len(records))]
        unit_ids = [f"record-{i}" for i in range(len(records))]
    else:
        stream = [t for ids in encoded for t in ids]
        ends = np.cumsum([len(ids) for ids in encoded])  # record i spans [ends[i] - len_i, ends[i])
        starts = ends - np.array([len(ids) for ids in encoded])
        n_windows = math.ceil((len(stream) - 1) / seq_len)  # window k trains pairs (t, t+1), t in [kL, kL+L)
        for k in range(n_windows):
            lo, hi = k * seq_len, min(k * seq_len + width, len(stream))
            seqs.append(stream[lo:hi])
            members.append(np.flatnonzero((starts < hi) & (ends > lo)).tolist())
        unit_ids = [f"sample-{k}" for k in range(n_windows)]

    n = len(seqs)
    tokens = np.full((n, width), pad_id, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    n_truncated = 0
    for row, seq in enumerate(seqs):
        if len(seq) > width:
            n_truncated += 1
            seq = seq[:width]
        tokens[row, : len(seq)] = seq
        lengths[row] = len(seq)
    tokens_t = torch.from_numpy(tokens)
    lengths_t = torch.from_numpy(lengths)
    targets = tokens_t[:, 1:].clone()  # (n, L)
    # Position j predicts token j+1, which is real only while j + 1 < length.
    targets[torch.arange(seq_len)[None, :] >= (lengths_t - 1)[:, None]] = IGNORE_INDEX
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
    return PackedData(tokens_t, targets, lengths_t, unit_ids, members)
