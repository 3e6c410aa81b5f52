"""CKKS encryption of federated updates: key ceremony, packing, validated aggregation, decryption.

Works on flat float32 numpy vectors plus a layout hash string; knows nothing of Flower or torch.
Banks: `load_secret_context` -> `encrypt_update` / `decrypt_mean`.
Server: `load_public_context` -> `aggregate` (adds ciphertexts; cannot decrypt).
"""

from crypto.aggregate import AggregateResult, aggregate
from crypto.errors import CryptoError, RejectedContribution
from crypto.keys import (
    CkksKey,
    CkksParams,
    KeyFiles,
    KeyInfo,
    key_id,
    keygen,
    load_public_context,
    load_secret_context,
)
from crypto.packing import (
    BundleHeader,
    ExpectedHeader,
    decrypt_bundle,
    decrypt_mean,
    encrypt_update,
    parse_bundle,
)

__all__ = [
    "AggregateResult",
    "BundleHeader",
    "CkksKey",
    "CkksParams",
    "CryptoError",
    "ExpectedHeader",
    "KeyFiles",
    "KeyInfo",
    "RejectedContribution",
    "aggregate",
    "decrypt_bundle",
    "decrypt_mean",
    "encrypt_update",
    "key_id",
    "keygen",
    "load_public_context",
    "load_secret_context",
    "parse_bundle",
]
