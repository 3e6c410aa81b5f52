"""Secure-aggregation building blocks: Shamir, the mask PRG, fixed point, parameters, neighbourhoods."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.ring import MAX_COEFF_BITS
from fedmoe.crypto.secagg.params import SecAggParams, dequantize, is_prime, neighbourhood, plain_modulus_for, quantize
from fedmoe.crypto.secagg.primitives import (
    derive_key,
    new_x25519,
    open_sealed,
    prg_mod,
    seal,
    shamir_combine,
    shamir_split,
)


def test_shamir_any_t_shares_recover_fewer_do_not() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir_split(secret, range(1, 6), 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine({x: shares[x] for x in subset}) == secret
    two = {x: shares[x] for x in (1, 4)}
    with pytest.raises(CryptoError):  # two points of a degree-2 polynomial: a random field element
        assert shamir_combine(two) != secret
    with pytest.raises(CryptoError):
        shamir_split(secret, [1, 1, 2], 2)


def test_prg_is_deterministic_uniform_and_separated() -> None:
    t = SecAggParams().plain_modulus
    seed = bytes(range(32))
    a = prg_mod(seed, 100_000, t, purpose="p", context={"r": 1})
    assert np.array_equal(a, prg_mod(seed, 100_000, t, purpose="p", context={"r": 1}))
    assert a.dtype == np.uint64 and int(a.max()) < t
    assert not np.array_equal(a[:100], prg_mod(seed, 100, t, purpose="p", context={"r": 2}))
    assert abs(float(a.mean()) / t - 0.5) < 0.01  # 100k uniform draws: sd of the mean ~ 0.0009
    small = prg_mod(seed, 50_000, 11, purpose="p", context={})  # heavy rejection path still exact
    assert np.bincount(small.astype(int), minlength=11).min() > 4000


def test_aead_binds_associated_data() -> None:
    sk_a, pk_a = new_x25519()
    sk_b, pk_b = new_x25519()
    ctx = {"job_id": "j", "round": 1, "pair": ["a", "b"]}
    k1, k2 = derive_key(sk_a, pk_b, purpose="x", context=ctx), derive_key(sk_b, pk_a, purpose="x", context=ctx)
    assert k1 == k2 and k1 != derive_key(sk_a, pk_b, purpose="y", context=ctx)
    nonce, ct = seal(k1, b"share", {"dealer": "a", "recipient": "b"})
    assert open_sealed(k2, nonce, ct, {"dealer": "a", "recipient": "b"}, what="t") == b"share"
    with pytest.raises(CryptoError) as e:
        open_sealed(k2, nonce, ct, {"dealer": "a", "recipient": "c"}, what="t")
    assert e.value.reason == "share"


def test_default_parameters() -> None:
    p = SecAggParams()
    t = p.plain_modulus
    assert is_prime(t) and t % (2 * p.poly_modulus_degree) == 1 and t.bit_length() == 58
    assert plain_modulus_for(20, 4096) % 8192 == 1
    # 128-bit security with room to spare: well under SEAL's ceiling for N (HE standard table)
    assert sum(p.coeff_mod_bit_sizes) <= MAX_COEFF_BITS[p.poly_modulus_degree] - 48
    # more than 64 banks: 1024 at the largest allowed value still sum below t / 2: no wrap-around.
    assert p.max_banks == 1024 and p.max_banks * p.max_abs_quantized <= (t - 1) // 2
    assert p.max_abs_value > 1e8  # room for |w * delta| with raw sample counts as weights
    assert SecAggParams.from_dict(p.to_dict()) == p
    bad_cases = (
        {"plain_bits": 80},
        {"plain_bits": 60},  # TenSEAL refuses it
        {"coeff_mod_bit_sizes": (60, 60, 60, 60)},  # 240 bits > 218 at N = 8192
        {"poly_modulus_degree": 1000},
        {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (44, 44, 21), "plain_bits": 56, "max_banks": 2**16},
    )  # the last: 25 bits of noise budget cannot sum 65536 inputs with 10 to spare
    for bad in bad_cases:
        with pytest.raises(CryptoError):
            SecAggParams(**bad)


@pytest.mark.parametrize("scale_bits", [12, 20, 30])
def test_quantization_error_is_half_a_step(scale_bits: int) -> None:
    p = SecAggParams(scale_bits=scale_bits)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 1e-2).astype(np.float32)
    w = 1234.0
    back = dequantize(quantize(x, w, p), p)
    assert back[-1] == w
    assert np.abs(back[:-1] - w * x.astype(np.float64)).max() <= 0.5 / p.scale + 1e-12
    with pytest.raises(CryptoError, match="exceeds"):
        quantize(np.full(3, 2 * p.max_abs_value, np.float32), 1.0, p)
    with pytest.raises(CryptoError, match="not finite"):
        quantize(np.array([np.nan], np.float32), 1.0, p)


def test_neighbourhoods_are_symmetric_and_deterministic() -> None:
    ids = tuple(f"b{i:02d}" for i in range(20))
    for k in (2, 4, 6):
        graph = {b: neighbourhood(b, ids, job_id="j", round=3, k=k) for b in ids}
        assert all(len(v) == k for v in graph.values())
        assert all(a in graph[b] for a in ids for b in graph[a])  # symmetric
        assert graph == {b: neighbourhood(b, ids[::-1], job_id="j", round=3, k=k) for b in ids}
    assert neighbourhood("b00", ids, job_id="j", round=3, k=4) != neighbourhood("b00", ids, job_id="j", round=4, k=4)
    assert neighbourhood("b00", ids, job_id="j", round=3, k=0) == ids[1:]
    with pytest.raises(CryptoError):
        neighbourhood("b00", ids, job_id="j", round=3, k=3)
