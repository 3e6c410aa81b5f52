"""Keys and encrypted aggregation of federated updates.

The default is secure aggregation, `fedmoe.crypto.secagg` (docs/secagg.md): each bank masks its
update (pairwise + self masks, mask keys Shamir-shared) and BFV-encrypts it, so neither the server
nor the server with one colluding bank reads it. Bank identities (Ed25519, pinned public keys) are
`fedmoe.crypto.identity`. Neither is re-exported here, so the server can import its side alone.

What this package's top level exports is the shared-key CKKS path (`aggregation = "ckks"`: one
institution's own silos, and the Ray simulation): `load_secret_context` -> `encrypt_update` /
`decrypt_mean` at the banks; `load_public_context` -> `aggregate` at the server (adds ciphertexts;
cannot decrypt). It works on flat float32 numpy vectors plus a layout hash; knows nothing of Flower
or torch.
"""

from fedmoe.crypto.aggregate import AggregateResult, aggregate
from fedmoe.crypto.errors import CryptoError, RejectedContribution
from fedmoe.crypto.keys import (
    CkksKey,
    CkksParams,
    KeyFiles,
    KeyInfo,
    key_id,
    keygen,
    load_public_context,
    load_secret_context,
)
from fedmoe.crypto.packing import (
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
