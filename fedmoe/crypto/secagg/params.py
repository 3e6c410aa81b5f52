"""Secure-aggregation parameters: BFV sizes, plaintext modulus, fixed-point scale, threshold, neighbours.

Pure functions and one frozen dataclass; shared by the bank and the server side.

Choice of the defaults (measured with TenSEAL 0.3.18 on the dev machine, see docs/secagg.md):
  N = 8192, coefficient moduli [54, 54, 54] bits: 162 bits, 56 under the HE standard's 128-bit
      ceiling for N = 8192 (218 bits; SEAL's CoeffModulus::MaxBitCount), so the default has room
      to spare (the earlier N = 4096 with 109 bits sat exactly on the ceiling). A fresh ciphertext
      lives modulo the two data primes (the last one is SEAL's special prime, only used for key
      switching, which nobody does here). ~30 bytes per value on the wire.
  t = the largest prime below 2^58 with t = 1 (mod 2N) (batching: N slots per ciphertext; TenSEAL
      refuses a 60-bit t). Measured noise budget of a fresh ciphertext: 42 bits (42 doublings of
      one ciphertext still decrypt), so the sum of max_banks = 1024 inputs plus one plaintext uses
      11 of them.
  scale = 2^20: a bank sends round(w * delta * 2^20) with w its sample weight. The mean's error is
      <= 2^-21 * K / sum(w) <= 4.8e-7 (w >= 1). The DP noise on a LoRA-B delta of the `small` preset
      is ~lr * sigma * clip / batch = 0.01 * 0.5 * 1 / 16 = 3e-4 per SGD step (AdamW: ~lr = 1e-2),
      so the quantization error is > 600x below it.
  max_banks = 1024: |round(w * delta * scale)| must stay below (t - 1) / 2 / max_banks ~ 2^47, i.e.
      |w * delta| < 1.3e8, so the sum of 1024 banks never wraps modulo t. (Past ~100 banks the
      pairwise shares grow as n^2 under everyone-neighbours-everyone; k-regular neighbourhoods,
      which the library supports, keep them at n k.)
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.ring import MAX_COEFF_BITS, ring_sizes

# The smallest floor of contributors a bank may set (its policy's `min-banks`): with two, the aggregate
# minus one's own update is the other's.
BANK_FLOOR = 3


@dataclass(frozen=True)
class SecAggParams:
    """What every party of a secure-aggregation job must agree on (carried in `RoundSetup`).

    Attributes:
        poly_modulus_degree: BFV N; a ciphertext holds N values (batching).
        coeff_mod_bit_sizes: BFV coefficient-modulus primes; the last is SEAL's special prime.
        plain_bits: the plaintext modulus t is the largest prime < 2^plain_bits with t = 1 mod 2N.
        scale_bits: fixed-point scale 2^scale_bits (quantization step 2^-scale_bits on w * delta).
        max_banks: most contributions one sum may hold; bounds |quantized value| so sums never wrap.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (54, 54, 54)
    plain_bits: int = 58
    scale_bits: int = 20
    max_banks: int = 1024

    def __post_init__(self) -> None:
        n, bits = ring_sizes(self, MAX_COEFF_BITS)
        if not bits or not all(isinstance(b, int) and 17 <= b <= 60 for b in bits):
            raise CryptoError(f"SecAggParams.coeff_mod_bit_sizes: expected ints in [17, 60], got {list(bits)}")
        if sum(bits) > MAX_COEFF_BITS[n]:
            raise CryptoError(
                f"SecAggParams.coeff_mod_bit_sizes: {sum(bits)} bits exceed the 128-bit-security limit "
                f"{MAX_COEFF_BITS[n]} for N = {n}"
            )
        if not isinstance(self.plain_bits, int) or not 20 <= self.plain_bits <= 59:
            raise CryptoError(f"SecAggParams.plain_bits: expected an int in [20, 59], got {self.plain_bits!r}")
        data_bits = sum(bits[:-1]) if len(bits) > 1 else bits[0]
        if not isinstance(self.max_banks, int) or not 2 <= self.max_banks <= 2**16:
            raise CryptoError(f"SecAggParams.max_banks: expected an int in [2, 65536], got {self.max_banks!r}")
        # Measured: fresh noise budget ~ data_bits - plain_bits - 7 bits; a sum of max_banks inputs and
        # one plaintext spends log2(max_banks + 1); keep 10 bits to spare after it.
        needed = math.ceil(math.log2(self.max_banks + 1)) + 10
        if data_bits - self.plain_bits - 7 < needed:
            raise CryptoError(
                f"SecAggParams: plain_bits {self.plain_bits} leaves under {needed} bits of BFV noise budget (sums "
                f"of {self.max_banks} inputs, 10 to spare) in the {data_bits} data bits of {list(bits)}"
            )
        if not isinstance(self.scale_bits, int) or not 0 <= self.scale_bits <= 40:
            raise CryptoError(f"SecAggParams.scale_bits: expected an int in [0, 40], got {self.scale_bits!r}")
        if self.max_abs_quantized < 2 ** (self.scale_bits + 8):
            raise CryptoError(
                f"SecAggParams: t / (2 max_banks) = {self.max_abs_quantized} leaves |w * delta| < 256 at "
                f"scale 2^{self.scale_bits}; raise plain_bits or lower max_banks/scale_bits"
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree

    @property
    def plain_modulus(self) -> int:
        return plain_modulus_for(self.plain_bits, self.poly_modulus_degree)

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def max_abs_quantized(self) -> int:
        """Largest |quantized value| one bank may send: max_banks of them sum below t/2."""
        return (self.plain_modulus - 1) // 2 // self.max_banks

    @property
    def max_abs_value(self) -> float:
        """Largest |w * delta| (and w) one bank may send."""
        return self.max_abs_quantized / self.scale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> SecAggParams:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise CryptoError(f"SecAggParams: malformed parameters {d!r:.200}: {e}", reason="malformed") from e


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the first 13 prime bases suffice)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=16)
def plain_modulus_for(bits: int, poly_modulus_degree: int) -> int:
    """Largest prime t < 2^bits with t = 1 (mod 2N): what BFV batching needs."""
    step = 2 * poly_modulus_degree
    k = (2**bits - 1) // step
    while k > 0:
        t = k * step + 1
        if is_prime(t):
            return t
        k -= 1
    raise CryptoError(f"no prime = 1 mod {step} below 2^{bits}")


# ------------------------------------------------------------------------------------------------
# threshold and neighbourhoods


def min_secure_threshold(holders: int, colluding: int = 1) -> int:
    """Smallest Shamir threshold t such that the server plus `colluding` banks cannot get both shares.

    A holder releases, per peer and round, either the self-mask share or the mask-key share, never
    both; a lying server can ask some holders for one and the rest for the other. Colluding holders
    give both. Recovering both secrets of an honest bank takes 2(t - c) honest holders out of
    holders - c, so it is impossible when 2t > holders + c.
    """
    return (holders + colluding) // 2 + 1


def default_threshold(holders: int) -> int:
    """max(2, ceil(2h/3), the server+1-bank bound): tolerates ~h/3 dropouts, resists ~h/3 colluders.

    h = holders of one bank's shares = its neighbours plus itself (h = n when everyone neighbours
    everyone). At h = 3 this is 3 (no dropout tolerated: with t = 2, the server and one bank could
    recover both masks of the third bank).
    """
    return max(2, math.ceil(2 * holders / 3), min_secure_threshold(holders, 1))


def neighbourhood(bank_id: str, participants: tuple[str, ...], *, job_id: str, round: int, k: int) -> tuple[str, ...]:
    """The banks `bank_id` exchanges pairwise masks and shares with (itself excluded), sorted.

    A deterministic function of (job id, round, sorted participants, k), so every party computes
    the same graph. k = 0 or k >= n - 1: everyone (Bonawitz et al., CCS 2017). Otherwise a random
    k-regular Harary graph (Bell et al., CCS 2020): the participants are placed on a ring in an
    order drawn from SHA-256(job, round, id), each linked to k/2 banks on either side (k even).
    """
    ids = tuple(sorted(participants))
    n = len(ids)
    if bank_id not in ids:
        raise CryptoError(f"neighbourhood: bank {bank_id!r} is not a participant", reason="unknown_bank")
    if k == 0 or k >= n - 1:
        return tuple(b for b in ids if b != bank_id)
    if k < 2 or k % 2:
        raise CryptoError(f"neighbourhood: k expected 0 (all) or an even number >= 2, got {k}")

    def ring_key(b: str) -> bytes:
        return hashlib.sha256(f"fedmoe/secagg/ring\0{job_id}\0{round}\0{b}".encode()).digest()

    ring = sorted(ids, key=ring_key)
    pos = ring.index(bank_id)
    near = {ring[(pos + d) % n] for d in range(-(k // 2), k // 2 + 1) if d != 0}
    return tuple(sorted(near))


# ------------------------------------------------------------------------------------------------
# fixed point <-> residues modulo t


def quantize(update: np.ndarray, weight: float, params: SecAggParams, *, bank_id: str = "?") -> np.ndarray:
    """[w * delta..., w] -> residues modulo t (uint64, length n + 1).

    Raises:
        CryptoError: non-finite values, or |w * delta| / w beyond `params.max_abs_value`.
    """
    if not isinstance(update, np.ndarray) or update.ndim != 1 or update.size == 0:
        raise CryptoError(f"quantize(bank {bank_id!r}): update expected a non-empty 1-D array")
    if not np.isfinite(update).all():
        bad = int(np.flatnonzero(~np.isfinite(update))[0])
        raise CryptoError(f"quantize(bank {bank_id!r}): update[{bad}] = {update[bad]} is not finite")
    w = float(weight)
    limit = params.max_abs_value
    if not (math.isfinite(w) and 0.0 < w <= limit):
        raise CryptoError(f"quantize(bank {bank_id!r}): weight expected a number in (0, {limit:.3g}], got {weight!r}")
    values = np.empty(update.size + 1, dtype=np.float64)  # (n + 1,): [w * delta..., w]
    np.multiply(update, w, out=values[:-1], dtype=np.float64)
    values[-1] = w
    q = np.rint(values * params.scale)
    peak = float(np.abs(q).max())
    if peak > params.max_abs_quantized:
        raise CryptoError(
            f"quantize(bank {bank_id!r}): max |w * delta| = {peak / params.scale:.3g} exceeds {limit:.3g}, "
            f"the room of t = 2^{params.plain_bits} for {params.max_banks} banks at scale 2^{params.scale_bits}"
        )
    return (q.astype(np.int64) % np.int64(params.plain_modulus)).astype(np.uint64)


def dequantize(residues: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Residues modulo t -> signed values / scale (float64); inverse of `quantize` for sums that fit."""
    t = params.plain_modulus
    r = np.asarray(residues, dtype=np.uint64) % np.uint64(t)
    signed = r.astype(np.int64) - np.where(r > (t - 1) // 2, np.int64(t), np.int64(0))
    return signed.astype(np.float64) / params.scale


def add_mod(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    """(a + b) mod t for residues < t < 2^63 (uint64, no overflow)."""
    return (a + b) % np.uint64(t)


def sub_mod(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    return (a + (np.uint64(t) - b)) % np.uint64(t)


def centered(residues: np.ndarray, t: int) -> np.ndarray:
    """Residues in [0, t) -> int64 in (-t/2, t/2]: what TenSEAL's BFV encoder takes."""
    r = np.asarray(residues, dtype=np.uint64)
    return r.astype(np.int64) - np.where(r > (t - 1) // 2, np.int64(t), np.int64(0))
