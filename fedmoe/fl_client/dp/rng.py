"""Randomness of DP-SGD: Poisson batch sampling and Gaussian noise, seeded or from the OS CSPRNG.

Poisson sampling (each unit joins each step's batch independently with probability q) is what
the subsampled-Gaussian accounting assumes; fixed-size shuffled batches are not. A step whose
batch comes out empty still takes a noise-only step, so the number of steps is what the
accountant is told.

secure_mode draws every uniform from `os.urandom` (the OS CSPRNG; torch's and numpy's
generators are predictable from their outputs) and makes each Gaussian coordinate the
2n-sample sum of Holohan & Braghin (2021, sec. 5.1) with n = 2, as Opacus' secure mode does,
against floating-point attacks on the noise (Mironov, 2012; Jin et al., 2022). Opacus' own
secure mode needs `torchcsprng`, which has no build for torch 2.x.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def secure_uniform(n: int) -> torch.Tensor:
    """n float64 uniforms in [0, 1) with 53 random bits each, from os.urandom."""
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
    return ((raw >> 11) & ((1 << 53) - 1)).to(torch.float64) * (2.0**-53)


def secure_standard_normal(n: int) -> torch.Tensor:
    """n float64 standard normals by Box-Muller from os.urandom uniforms."""
    half = (n + 1) // 2
    u1 = 1.0 - secure_uniform(half)  # (0, 1]: log is finite
    u2 = secure_uniform(half)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def secure_gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise shaped like `reference`: (sum of 4 CSPRNG Gaussians of std) / 2."""
    n = reference.numel()
    total = secure_standard_normal(n)
    for _ in range(3):
        total += secure_standard_normal(n)
    return (total * (std / 2.0)).to(reference.dtype).view(reference.shape).to(reference.device)


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
