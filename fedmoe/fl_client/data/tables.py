"""Tables of the synthetic bank corpus: how each locale writes, its templates, merchant categories.

Values (names, cities, companies, jobs, IBANs, domains, foreign currencies) come from Faker at
generation time (synthetic.py); these tables only say how a bank in each locale writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["transaction", "support", "kyc"]
KINDS: tuple[str, ...] = ("transaction", "support", "kyc")


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
DAY_HOURS: tuple[float, ...] = (1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 3, 5, 6, 6, 7, 8, 7, 6, 6, 7, 8, 8, 7, 5, 4, 3, 2)
