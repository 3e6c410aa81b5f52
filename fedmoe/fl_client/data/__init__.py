"""One bank's text data: a synthetic non-IID corpus, file loading, train/eval split, packing.

Four steps, in the order a bank uses them:
1. `make_bank_profiles` + `generate_bank_corpus` (synthetic.py, tables in tables.py): synthetic
   banks that differ in locale, language, currency, merchant and customer mix, template mix and
   fraud rate. Or `load_text_file` (files.py): a bank's own JSONL, CSV or Parquet file with a
   `text` column and an optional `customer_id` column.
2. `train_eval_split` (split.py): deterministic by seed; by customer when the customer is the
   privacy unit.
3. `pack_records` (packing.py): token ids -> fixed-length samples. What one sample holds decides
   what DP-SGD protects: one record (record-level DP) or all of one customer's rows
   (customer-level DP).

The corpus tables (templates, merchant categories, locale styles) are in fedmoe.fl_client.data.tables.
"""

from fedmoe.fl_client.data.checks import PrivacyUnit
from fedmoe.fl_client.data.files import SUPPORTED_SUFFIXES, load_text_file, write_jsonl
from fedmoe.fl_client.data.packing import IGNORE_INDEX, PACK_MODES, PackedData, PackMode, pack_records
from fedmoe.fl_client.data.split import train_eval_split
from fedmoe.fl_client.data.synthetic import BankProfile, generate_bank_corpus, make_bank_profiles
from fedmoe.fl_client.data.tables import BANK_LOCALES, KINDS, LOCALE_STYLES
from fedmoe.protocol.config import PRIVACY_UNITS

__all__ = [
    "BANK_LOCALES",
    "IGNORE_INDEX",
    "KINDS",
    "LOCALE_STYLES",
    "PACK_MODES",
    "PRIVACY_UNITS",
    "SUPPORTED_SUFFIXES",
    "BankProfile",
    "PackMode",
    "PackedData",
    "PrivacyUnit",
    "generate_bank_corpus",
    "load_text_file",
    "make_bank_profiles",
    "pack_records",
    "train_eval_split",
    "write_jsonl",
]
