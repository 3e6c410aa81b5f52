"""CKKS encryption of federated updates: key ceremony, packing, validated aggregation, decryption.

Works on flat float32 numpy vectors plus a layout hash string; knows nothing of Flower or torch.
Banks: `load_secret_context` -> `encrypt_update` / `decrypt_mean`.
Server: `load_public_context` -> `aggregate` (adds ciphertexts; cannot decrypt).

Secure aggregation (mask, then BFV-encrypt; the server plus one bank cannot read another bank's
update) lives in `crypto.secagg` (docs/secagg.md); bank identities (Ed25519, pinned public keys)
in `crypto.identity`. Neither is re-exported here, so the server can import its side alone.
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
