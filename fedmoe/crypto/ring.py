"""The ring sizes both schemes share: SEAL's modulus limits and the first check of a parameter dataclass.

CKKS (`fedmoe.crypto.keys.CkksParams`) and BFV (`fedmoe.crypto.secagg.params.SecAggParams`) both pick a
poly_modulus_degree N and coefficient-modulus primes whose total size SEAL bounds for 128-bit
security; each then checks its own prime sizes and scales.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fedmoe.crypto.errors import CryptoError

# SEAL's CoeffModulus::MaxBitCount at 128-bit security, by N.
MAX_COEFF_BITS = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def ring_sizes(params: Any, allowed: Collection[int]) -> tuple[int, tuple[int, ...]]:
    """Store `params.coeff_mod_bit_sizes` as a tuple and check `params.poly_modulus_degree`.

    JSON gives a list; the frozen dataclass keeps a tuple so it stays hashable and immutable.

    Returns:
        (N, the bit sizes).

    Raises:
        CryptoError: N not in `allowed`.
    """
    bits = tuple(params.coeff_mod_bit_sizes)
    object.__setattr__(params, "coeff_mod_bit_sizes", bits)
    n = params.poly_modulus_degree
    if n not in allowed:
        raise CryptoError(f"{type(params).__name__}.poly_modulus_degree: expected one of {sorted(allowed)}, got {n!r}")
    return n, bits
