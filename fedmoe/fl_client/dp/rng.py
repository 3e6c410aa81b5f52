"""Randomness of DP-SGD: Poisson batch sampling and Gaussian noise, seeded or from a CSPRNG.

Poisson sampling (each unit joins each step's batch independently with probability q) is what
the subsampled-Gaussian accounting assumes; fixed-size shuffled batches are not. A step whose
batch comes out empty still takes a noise-only step, so the number of steps is what the
accountant is told.

secure_mode noise (`secure_gaussian_like`):
    randomness  AES-256-CTR keystream under a fresh 256-bit key from `os.urandom` for every
                call: one step's noise for all its tensors (`secure_gaussian_like_all`), or one
                tensor (a stream cipher keyed from the OS CSPRNG is a CSPRNG; AES-NI makes it
                ~GB/s). Nothing is kept between calls, so two steps, two processes (forked or
                not) never share a key; torch's and numpy's generators, predictable from their
                outputs, are never used.
    transform   each N(0, 1) term by the ziggurat method (Marsaglia & Tsang 2000, 256 layers; the
                layout of numpy's `standard_normal`) from one 64-bit word: 8 bits pick the layer,
                one the sign, the top 53 the uniform; ~98.5 % of words are accepted at once, the
                rest take the exact wedge / tail tests with further words, and a rejected word
                restarts with fresh ones, so the output is exactly the ziggurat distribution.
    defence     every coordinate is (z1 + z2) / sqrt(2) with z_i independent N(0, std^2): Holohan &
                Braghin's (2021, sec. 5.1) sum of n = 2 samples against floating-point attacks on the
                noise (Mironov 2012; Jin et al. 2022). Their 2n samples are for samplers whose draws
                share uniforms (Box-Muller's pairs: cos + sin of one pair collapse to one normal);
                "we need only use n samples for sampling procedures that do not share uniform
                variates between executions" (their footnote 3), and a ziggurat draw uses its own
                word(s) only. So Opacus' secure mode, on torch's Box-Muller, sums 4 (n = 2) and this
                sums 2 (n = 2). Each term is one of ~2^61 float64 values (Box-Muller's: 2^53), so
                the ~2^122 pairs give ~2^60 pairs per float64 value of the sum on average, which
                is then rounded to the gradient's float32. `_TERMS = 4` would cost ~1.6x the noise time
                (docs/performance.md) for no gain under that argument. A discrete Gaussian was not
                chosen: it needs the clipped gradients on an integer grid and an exact sampler whose
                rejection loops run per coordinate.
    timing      the work per tensor depends only on how many words took the slow path (a
                Binomial count over millions of words, independent of the data): no timing channel
                on the gradients. The terms are summed in float64 and rounded once to the
                tensor's dtype.
Opacus' own secure mode needs `torchcsprng`, which has no build for torch 2.x.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch.utils.data import Sampler

# ---------------------------------------------------------------------------------------------
# Keystream
# ---------------------------------------------------------------------------------------------

_KEY_BYTES = 32  # AES-256
_CHUNK = 1 << 16  # coordinates per chunk: 2 terms x 8 bytes x 64K = 1 MiB of keystream
_TERMS = 2  # Holohan & Braghin's n = 2 (no 2n: ziggurat draws share no uniforms); the code assumes 2


class CipherStream:
    """64-bit words of an AES-256-CTR keystream under a fresh `os.urandom` key (one per stream).

    The key never leaves the object; the counter starts at zero, which is safe because no key is
    used twice. Words are the keystream itself (the encryption of zero bytes).
    """

    def __init__(self) -> None:
        key = os.urandom(_KEY_BYTES)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(0)

    def fill(self, out: bytearray, n_bytes: int) -> None:
        """Writes the next n_bytes of keystream into out[:n_bytes] (len(out) >= n_bytes + 15)."""
        if len(self._zeros) < n_bytes:
            self._zeros = bytes(n_bytes)
        self._encryptor.update_into(memoryview(self._zeros)[:n_bytes], out)

    def words(self, n: int) -> np.ndarray:
        """The next n keystream words as a new uint64 array [n]."""
        out = bytearray(8 * n + 15)  # update_into wants room for one block more
        self.fill(out, 8 * n)
        return np.frombuffer(out, dtype=np.uint64, count=n)

    def uniforms(self, n: int) -> np.ndarray:
        """n float64 uniforms in (0, 1] with 53 random bits each (log is finite)."""
        return ((self.words(n) >> 11) + 1) * 2.0**-53


def secure_uniform(n: int) -> torch.Tensor:
    """n float64 uniforms in [0, 1) with 53 random bits each, from a fresh CSPRNG stream."""
    return torch.from_numpy(CipherStream().uniforms(n) - 2.0**-53)


# ---------------------------------------------------------------------------------------------
# Ziggurat (Marsaglia & Tsang 2000, 256 layers of equal area; numpy's layout)
# ---------------------------------------------------------------------------------------------
# f(x) = exp(-x^2/2). Layer 0 is the base strip [0, R] x [0, f(R)] plus the tail beyond R; layer i
# >= 1 spans y in [f(X[i]), f(X[i-1])] (f(X[0]) read as 1 for i = 1), x in [0, X[i]], with X[1]
# the narrowest (top) and X[255] = R. A point u X[i], 0 < u < 1, is under the curve for sure when
# u X[i] < X[i-1] (the width of the layer below); X[0] = area / f(R) is the base strip's width.
# A word w gives the layer (bits 0-7), the sign (bit 8) and u = (w >>> 11 + 1/2) / 2^53 (53 bits);
# the tables are indexed by the low 9 bits, so the sign rides in the table (W[j + 256] = -W[j]).

_R = 3.6541528853610088  # the tail's start for 256 layers (numpy's ziggurat_nor_r)


def _f(x: float) -> float:
    return math.exp(-0.5 * x * x)


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W [512], K [512], F_lo [256], F_hi [256]): +-X[i] / 2^53, 2^53 X[i-1] / X[i], f(X[i]), f(X[i-1])."""
    area = _R * _f(_R) + math.sqrt(math.pi / 2) * math.erfc(_R / math.sqrt(2))
    x = [0.0] * 256
    x[0], x[255] = area / _f(_R), _R
    for i in range(255, 1, -1):
        x[i - 1] = math.sqrt(-2.0 * math.log(area / x[i] + _f(x[i])))
    assert abs(x[1] * (1.0 - _f(x[1])) / area - 1.0) < 1e-9, "the top layer must have the others' area"
    width = np.array(x) * 2.0**-53
    inner = np.array([2.0**53 * _R / x[0], 0.0] + [2.0**53 * x[i - 1] / x[i] for i in range(2, 256)])
    f_lo = np.array([_f(_R)] + [_f(xi) for xi in x[1:]])
    f_hi = np.array([_f(_R), 1.0] + [_f(x[i - 1]) for i in range(2, 256)])
    return np.concatenate([width, -width]), np.concatenate([inner, inner]), f_lo, f_hi


_W, _K, _F_LO, _F_HI = _ziggurat_tables()
_W_T, _K_T = torch.from_numpy(_W), torch.from_numpy(_K)  # torch.index_select: faster than np.take


def _tail(stream: CipherStream, n: int) -> np.ndarray:
    """n draws of |Z| - R given |Z| > R (Marsaglia 1964): a = -ln(U1)/R, kept when -2 ln(U2) > a^2."""
    out = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        a = -np.log(stream.uniforms(todo.size)) / _R
        keep = -2.0 * np.log(stream.uniforms(todo.size)) > a * a
        out[todo[keep]] = a[keep]
        todo = todo[~keep]
    return out


def _slow_path(stream: CipherStream, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """N(0, 1) outcome of the words outside their layer's inner box: tail, wedge test or restart.

    x: u X[layer] with the word's sign; index: layer + 256 * sign, the words' low 9 bits.
    """
    out, layer = x.copy(), index & 0xFF
    base = layer == 0
    if base.any():  # beyond R: a tail draw, with the word's sign
        out[base] = np.copysign(_R + _tail(stream, int(base.sum())), x[base])
    wedge = np.flatnonzero(~base)
    if wedge.size:
        lo, hi = _F_LO[layer[wedge]], _F_HI[layer[wedge]]
        y = lo + (hi - lo) * stream.uniforms(wedge.size)
        xw = x[wedge]
        rejected = wedge[y >= np.exp(-0.5 * xw * xw)]
        if rejected.size:  # a rejected point restarts the whole draw with fresh words
            out[rejected] = _Ziggurat(rejected.size).draw(stream, rejected.size)
    return out


class _Ziggurat:
    """Buffers for up to n normals per draw, one keystream word each (~1.5 % take the slow path)."""

    def __init__(self, n: int) -> None:
        self._raw = bytearray(8 * n + 15)  # update_into wants room for one block more
        self._w = np.frombuffer(self._raw, dtype=np.uint64, count=n)
        self._top, self._u, self._slow = np.empty(n, np.uint64), np.empty(n), np.empty(n, bool)
        self._index_t = torch.empty(n, dtype=torch.int64)
        self._x_t, self._k_t = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        self._index, self._x, self._k = self._index_t.numpy(), self._x_t.numpy(), self._k_t.numpy()

    def fast(self, stream: CipherStream, n: int, table: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The fast path of n draws: (x [n], a view valid until the next call; positions of the words
        outside their layer's inner box, whose x are placeholders for `_slow_path`).

        `table` is `_W` times the draws' standard deviation, as a tensor.
        """
        stream.fill(self._raw, 8 * n)
        index, x, u = self._index[:n], self._x[:n], self._u[:n]
        np.bitwise_and(self._w[:n], 0x1FF, out=index.view(np.uint64))
        np.add(np.right_shift(self._w[:n], 11, out=self._top[:n]), 0.5, out=u)  # 2^53 u
        torch.index_select(table, 0, self._index_t[:n], out=self._x_t[:n])
        np.multiply(x, u, out=x)
        torch.index_select(_K_T, 0, self._index_t[:n], out=self._k_t[:n])
        return x, np.flatnonzero(np.greater_equal(u, self._k[:n], out=self._slow[:n]))

    def slow_inputs(self, slow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u X[layer] with the sign, low 9 bits) of the words at `slow` of the last `fast` call."""
        index = self._index[slow]
        return self._u[slow] * _W[index], index

    def draw(self, stream: CipherStream, n: int) -> np.ndarray:
        """n float64 N(0, 1) draws: a view of this object's buffer, valid until the next draw."""
        x, slow = self.fast(stream, n, _W_T)
        if slow.size:
            x[slow] = _slow_path(stream, *self.slow_inputs(slow))
        return x


def standard_normal(stream: CipherStream, n: int) -> torch.Tensor:
    """n independent float64 N(0, 1) draws from `stream` (ziggurat, one word each)."""
    return torch.from_numpy(_Ziggurat(n).draw(stream, n).copy())


def secure_gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise shaped like `reference` (its dtype and device), from a fresh CSPRNG key.

    Each coordinate is (z_1 + ... + z_T) / sqrt(T), T = `_TERMS`, with z_t ~ N(0, std^2), summed in
    float64 and rounded once to float32 or float64 (other dtypes: float32, then theirs). Drawn on
    the CPU, `_CHUNK` coordinates at a time; the ~1.5 % of words that need the slow path are
    finished in one batch at the end (a batch per chunk would cost more than the fast path).

    Args:
        reference: the tensor whose shape, dtype and device the noise takes.
        std: the standard deviation (sigma * C); 0 gives zeros without drawing.
    """
    n = reference.numel()
    if std == 0 or n == 0:
        return torch.zeros_like(reference)
    out = torch.empty(n, dtype=reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float32)
    out_np, scale, stream, chunk = out.numpy(), std / math.sqrt(_TERMS), CipherStream(), min(_CHUNK, n)
    zig, table, slow_words = _Ziggurat(_TERMS * chunk), torch.from_numpy(_W * scale), _SlowWords()
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x, slow = zig.fast(stream, _TERMS * m, table)
        terms = x.reshape(_TERMS, m)
        if slow.size:
            slow_words.add(zig, slow, terms, start)
        np.add(terms[0], terms[1], out=out_np[start : start + m])  # float64 sum, one rounding
    slow_words.finish(stream, out_np, scale)
    return out.view(reference.shape).to(device=reference.device, dtype=reference.dtype)


def secure_gaussian_like_all(references: list[torch.Tensor], std: float) -> list[torch.Tensor]:
    """`secure_gaussian_like` for several tensors from ONE fresh CSPRNG key: one stream, cut in turn.

    The noise of one DP step: a key per step instead of per tensor saves the per-tensor set-up
    (~2.5 ms of 7 for FFA-LoRA's 18 tensors) and keeps every property above (the coordinates are
    consecutive draws of one keystream, so independent; nothing is kept after the call).

    Args:
        references: the tensors whose shapes, dtypes and devices the noises take (any mix).
        std: the standard deviation; 0 gives zeros.

    Returns:
        One noise tensor per reference, in order.
    """
    wide = any(r.dtype == torch.float64 for r in references)
    flat = torch.empty(sum(r.numel() for r in references), dtype=torch.float64 if wide else torch.float32)
    noise, out, start = secure_gaussian_like(flat, std), [], 0
    for ref in references:
        part = noise[start : start + ref.numel()].view(ref.shape)
        out.append(part.to(device=ref.device, dtype=ref.dtype))  # a view of the one draw where it can
        start += ref.numel()
    return out


@dataclass
class _SlowWords:
    """The words of every chunk that left the fast path, finished in one batch at the end.

    A chunk's words are laid out term-major (word j < m is term 0 of coordinate j, word m + j its
    term 1) and its slow positions come ascending, so row-0 words come first. Each slow word keeps
    its coordinate and the other term of that coordinate; a coordinate whose two terms are both
    slow is also kept as a pair, since there the "other" term is a placeholder.
    """

    coord: list[np.ndarray] = field(default_factory=list)  # global coordinate of each slow word
    other: list[np.ndarray] = field(default_factory=list)  # the other term of that coordinate
    x: list[np.ndarray] = field(default_factory=list)  # u X[layer] of each slow word, with its sign
    index: list[np.ndarray] = field(default_factory=list)  # its low 9 bits
    pairs: list[np.ndarray] = field(default_factory=list)  # [2, p] positions of both-slow coordinates
    count: int = 0

    def add(self, zig: _Ziggurat, slow: np.ndarray, terms: np.ndarray, start: int) -> None:
        m = terms.shape[1]
        n0 = int(np.searchsorted(slow, m))
        c0, c1 = slow[:n0], slow[n0:] - m
        self.coord += [start + c0, start + c1]
        self.other += [terms[1, c0], terms[0, c1]]
        x, index = zig.slow_inputs(slow)
        self.x.append(x)
        self.index.append(index)
        if n0 and c1.size:  # both terms slow: c1 also in c0 (both ascending)
            at = np.minimum(np.searchsorted(c0, c1), n0 - 1)
            both = c0[at] == c1
            if both.any():
                self.pairs.append(np.stack([self.count + at[both], self.count + n0 + np.flatnonzero(both)]))
        self.count += slow.size

    def finish(self, stream: CipherStream, out_np: np.ndarray, scale: float) -> None:
        """Draws the slow words' values and writes their coordinates: z + other, or z0 + z1."""
        if not self.count:
            return
        z = scale * _slow_path(stream, np.concatenate(self.x), np.concatenate(self.index))
        coord = np.concatenate(self.coord)
        out_np[coord] = z + np.concatenate(self.other)  # float64 sum, one rounding
        if self.pairs:
            first, second = np.concatenate(self.pairs, axis=1)
            out_np[coord[first]] = z[first] + z[second]


# ---------------------------------------------------------------------------------------------
# Poisson batch sampling
# ---------------------------------------------------------------------------------------------


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields `steps` batches; each index joins each batch independently with probability q.

    Args:
        n_samples: units to sample from.
        sample_rate: q.
        steps: batches per pass (the round's local steps).
        generator: torch.Generator for reproducible runs; None with secure=True.
        secure: draw the coin flips from the OS CSPRNG instead.
    """

    def __init__(
        self, n_samples: int, sample_rate: float, steps: int, *, generator: torch.Generator | None, secure: bool
    ) -> None:
        super().__init__()
        assert secure == (generator is None), "secure sampling takes no generator; seeded sampling needs one"
        self.n_samples, self.sample_rate, self.steps = n_samples, sample_rate, steps
        self.generator, self.secure = generator, secure

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.secure:
                u = secure_uniform(self.n_samples)
            else:
                u = torch.rand(self.n_samples, generator=self.generator, dtype=torch.float64)
            yield torch.nonzero(u < self.sample_rate).flatten().tolist()
