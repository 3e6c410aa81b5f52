"""secure_mode noise (fedmoe/fl_client/dp/rng.py): its distribution, its independence, its source.

Every bound is set from the sample size: a statistic whose standard error is s must sit within
6 s (two-sided p ~ 2e-9 per check), so a real defect of a few per cent fails and a fresh CSPRNG
draw does not. KS critical values for alpha = 1e-6.
"""

from __future__ import annotations

import math
import multiprocessing
import warnings

import numpy as np
import pytest
import torch
from test_dp_helpers import single_thread, tiny_model, token_batch, trainable  # noqa: F401  (single_thread: autouse fixture)

from fedmoe.fl_client.dp import DPConfig, make_private, rng
from fedmoe.fl_client.dp.rng import CipherStream, secure_gaussian_like, secure_uniform, standard_normal

KS_C = math.sqrt(-math.log(1e-6 / 2) / 2)  # sup |F_n - F| < KS_C / sqrt(n) with prob 1 - 1e-6
R = 3.6541528853610088  # where the ziggurat's tail path starts


def ks_distance(sorted_x: torch.Tensor, std: float) -> float:
    """sup_x |F_n(x) - Phi(x / std)| of a sorted float64 sample."""
    cdf = torch.special.ndtr(sorted_x / std)
    n = sorted_x.numel()
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((upper - cdf).max().item(), (cdf - (upper - 1.0 / n)).max().item())


def assert_normal_moments(x: torch.Tensor, std: float) -> None:
    z = x.double() / std
    n = z.numel()
    assert abs(z.mean().item()) < 6 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 6 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3) < 6 * math.sqrt(96 / n)


def test_ten_million_draws_are_n0_sigma2_moments_and_ks():
    std = 1.7
    x = secure_gaussian_like(torch.empty(10_000_000, dtype=torch.float32), std)
    assert x.dtype == torch.float32 and x.shape == (10_000_000,)
    assert_normal_moments(x, std)
    xs = torch.sort(x.double()).values
    assert ks_distance(xs, std) < KS_C / math.sqrt(x.numel())
    # A std off by 4 % moves the KS distance by ~0.04 * phi(1) ~ 0.01, 12x the bound above.
    assert ks_distance(xs, std * 0.96) > 5 * KS_C / math.sqrt(x.numel())


def test_single_ziggurat_terms_are_standard_normal_tails_included():
    n = 4_000_000
    z = standard_normal(CipherStream(), n)
    assert_normal_moments(z, 1.0)
    assert ks_distance(torch.sort(z).values, 1.0) < KS_C / math.sqrt(n)
    for cut in (R, 4.5):  # the tail path (beyond R) and far into it
        p = math.erfc(cut / math.sqrt(2))
        count = int((z.abs() > cut).sum())
        assert abs(count - n * p) < 6 * math.sqrt(n * p), (cut, count, n * p)
    # Wedges: within each layer band the density must follow the curve, not the rectangle.
    hist = torch.histc(z, bins=80, min=-4.0, max=4.0)
    edges = torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)
    expected = n * (torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1]))
    chi2 = float(((hist.double() - expected) ** 2 / expected).sum())
    assert chi2 < 80 + 6 * math.sqrt(160), chi2


def test_draws_are_independent_within_and_across_steps():
    n = 1_000_000
    ref = torch.empty(n, dtype=torch.float64)
    a, b = secure_gaussian_like(ref, 1.0), secure_gaussian_like(ref, 1.0)
    bound = 6 / math.sqrt(n)

    def corr(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([u, v]))[0, 1])

    assert abs(corr(a, b)) < bound  # two steps
    assert abs(corr(a[1:], a[:-1])) < bound  # neighbours
    for lag in (rng._CHUNK, rng._CHUNK // 2):  # one chunk's terms come from one keystream block
        assert abs(corr(a[lag:], a[:-lag])) < bound
    assert abs(corr(a[: n // 2], a[n // 2 :])) < bound
    assert not torch.equal(a[:1000], b[:1000])


def _draw_in_child(_: int) -> list[float]:
    return secure_gaussian_like(torch.zeros(1000, dtype=torch.float64), 1.0).tolist()


def test_two_processes_never_repeat_a_stream():
    """Forked children inherit the parent's memory: a key from a userland PRNG would repeat there."""
    secure_gaussian_like(torch.zeros(10), 1.0)  # the parent has drawn before forking
    with multiprocessing.get_context("fork").Pool(2) as pool:
        first, second = pool.map(_draw_in_child, [0, 1], chunksize=1)
    parent = _draw_in_child(0)
    assert not set(first) & set(second) and not set(first) & set(parent) and not set(second) & set(parent)


def test_every_stream_has_its_own_key():
    words = [CipherStream().words(4).tolist() for _ in range(3)]
    assert len({tuple(w) for w in words}) == 3
    u = secure_uniform(100_000).numpy()
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / u.size)
    assert secure_uniform(0).numel() == 0


def test_noise_takes_the_reference_shape_dtype_and_zero_std():
    ref = torch.ones(3, 5, dtype=torch.bfloat16)
    noise = secure_gaussian_like(ref, 2.0)
    assert noise.shape == (3, 5) and noise.dtype == torch.bfloat16 and noise.abs().sum() > 0
    assert torch.equal(secure_gaussian_like(ref, 0.0), torch.zeros_like(ref))
    assert secure_gaussian_like(torch.empty(0), 1.0).numel() == 0


def test_noise_does_not_use_torch_generators():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = secure_gaussian_like(torch.zeros(1000), 1.0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    assert not torch.equal(a, secure_gaussian_like(torch.zeros(1000), 1.0))


# ---------------------------------------------------------------------------------------------
# Through the optimizer: the secure step's noise, and the seeded path where a policy asks for it
# ---------------------------------------------------------------------------------------------


def private_noise(grad_sample_mode: str, *, secure: bool, seed: int | None = None) -> torch.Tensor:
    """The noise one private step adds (p.grad - summed_grad / B over all trainable coordinates)."""
    model = tiny_model("router+experts")
    inputs, targets = token_batch(4, 8, seed=3)
    cfg = DPConfig(
        target_epsilon=1.0,
        delta=1e-5,
        clip_norm=0.5,
        expected_batch_size=4,
        grad_sample_mode=grad_sample_mode,
        secure_mode=secure,
    )
    gen = None if secure else torch.Generator().manual_seed(seed)
    private = make_private(model, cfg, noise_multiplier=1.1, seq_len=8, generator=gen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            private.backward(inputs, targets)
        torch.manual_seed(0)  # what a step that drew from torch's global generator would repeat
        state = torch.get_rng_state()
        assert private.optimizer.pre_step()
        if secure:
            assert torch.equal(torch.get_rng_state(), state), "secure noise drew from torch's global generator"
        params = list(trainable(model).values())
        return torch.cat([(p.grad - p.summed_grad / 4).reshape(-1) for p in params])
    finally:
        private.close()


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "mixed"])
def test_secure_step_noise_is_fresh_and_independent_of_torch_seed(grad_sample_mode):
    first = private_noise(grad_sample_mode, secure=True)
    second = private_noise(grad_sample_mode, secure=True)
    assert not torch.equal(first, second)
    assert abs(float(np.corrcoef(first.numpy(), second.numpy())[0, 1])) < 6 / math.sqrt(first.numel())


def test_seeded_step_noise_is_reproducible():
    assert torch.equal(private_noise("mixed", secure=False, seed=7), private_noise("mixed", secure=False, seed=7))
    assert not torch.equal(private_noise("mixed", secure=False, seed=7), private_noise("mixed", secure=False, seed=8))


def test_one_step_draws_every_tensor_from_one_fresh_key(monkeypatch):
    """A DP step's noise: one CSPRNG stream for all its tensors, each N(0, std^2), shaped like its
    reference; the next step takes a new key."""
    keys = []
    real = rng.CipherStream.__init__

    def counting(self):
        keys.append(1)
        real(self)

    monkeypatch.setattr(rng.CipherStream, "__init__", counting)
    refs = [torch.zeros(400_000), torch.zeros(300, 1000, dtype=torch.float64), torch.zeros(7, 3, dtype=torch.bfloat16)]
    first = rng.secure_gaussian_like_all(refs, 2.0)
    assert len(keys) == 1
    assert [(n.shape, n.dtype) for n in first] == [(r.shape, r.dtype) for r in refs]
    for noise in first[:2]:
        assert_normal_moments(noise, 2.0)
    assert abs(float(torch.corrcoef(torch.stack([first[0][:300_000], first[1].flatten().float()]))[0, 1])) < 6 / 548
    wide = first[1].flatten()
    assert not torch.equal(wide.float().double(), wide)  # float64 noise is drawn in float64, not float32
    second = rng.secure_gaussian_like_all(refs, 2.0)
    assert len(keys) == 2 and not torch.equal(first[0], second[0])
    # consecutive, disjoint parts of the one stream: no value of one tensor's noise repeats in another's
    parts = rng.secure_gaussian_like_all([torch.zeros(1000, dtype=torch.float64)] * 3, 1.0)
    assert torch.cat(parts).unique().numel() == 3000
    assert all(
        torch.equal(n, torch.zeros_like(r)) for n, r in zip(rng.secure_gaussian_like_all(refs, 0.0), refs, strict=True)
    )


def _reference_noise(n: int, std: float) -> tuple[torch.Tensor, int]:
    """secure_gaussian_like spelled out: every chunk's fast-path terms copied, then all slow words
    drawn in one batch in the same order, put in place, and each coordinate's two terms summed."""
    stream, scale = rng.CipherStream(), std / math.sqrt(2)
    zig, table, chunk = rng._Ziggurat(2 * rng._CHUNK), torch.from_numpy(rng._W * scale), rng._CHUNK
    terms, slow_at, xs, indices = [], [], [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x, slow = zig.fast(stream, 2 * m, table)
        terms.append(x.reshape(2, m).copy())
        slow_at.append((len(terms) - 1, slow // m, slow % m))
        slow_x, slow_index = zig.slow_inputs(slow)
        xs.append(slow_x)
        indices.append(slow_index)
    z = scale * rng._slow_path(stream, np.concatenate(xs), np.concatenate(indices))
    used, both = 0, 0
    for c, term, column in slow_at:
        terms[c][term, column] = z[used : used + term.size]
        used += term.size
        both += len(set(column[term == 0]) & set(column[term == 1]))
    return torch.from_numpy(np.concatenate([t[0] + t[1] for t in terms]).astype(np.float32)), both


@pytest.mark.parametrize(("chunk", "n"), [(rng._CHUNK, 1_000_003), (256, 200_003)])
def test_slow_words_are_put_back_exactly(monkeypatch, chunk, n):
    """The batched slow-path bookkeeping (each slow word's coordinate and the other term; pairs
    where both terms are slow) against the spelled-out reference, bit for bit, same keystream.
    Small chunks make the edges common: a chunk with no slow word in one term, a pair at a chunk's
    last slow word."""
    monkeypatch.setattr(rng.os, "urandom", lambda k: bytes(range(k)))
    monkeypatch.setattr(rng, "_CHUNK", chunk)
    got = secure_gaussian_like(torch.empty(n), 1.3)
    expected, both_slow = _reference_noise(n, 1.3)
    assert both_slow > 20  # ~0.015^2 of the coordinates: the pair path ran
    assert torch.equal(got, expected)
