"""Helpers shared by the crypto tests (plain module, imported by name like kernels' kernel_helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmoe.crypto import CkksKey, ExpectedHeader, encrypt_update

LAYOUT = "3f1c" * 16  # stands in for the model side's layout hash (64 hex chars)
ROUND = 3


def expected_for(key: CkksKey, n: int, *, round: int = ROUND, layout: str = LAYOUT) -> ExpectedHeader:
    return ExpectedHeader(key_id=key.key_id, epoch=key.epoch, round=round, layout_hash=layout, n_elements=n)


def make_updates(k: int, n: int, *, seed: int = 0, scale: float = 1e-2) -> tuple[list[np.ndarray], list[float]]:
    """k random float32 updates of n elements and integer sample-count weights in the thousands."""
    rng = np.random.default_rng(seed)
    updates = [(rng.standard_normal(n) * scale).astype(np.float32) for _ in range(k)]
    weights = [float(w) for w in rng.integers(1_000, 9_000, size=k)]
    return updates, weights


def plain_weighted_mean(updates: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = np.zeros(updates[0].shape, dtype=np.float64)
    for u, w in zip(updates, weights, strict=True):
        total += w * u.astype(np.float64)
    return total / sum(weights)


def encrypt_all(
    key: CkksKey, updates: list[np.ndarray], weights: list[float], *, round: int = ROUND, layout: str = LAYOUT
) -> dict[str, bytes]:
    return {
        f"bank{i}": encrypt_update(u, weight=w, key=key, round=round, layout_hash=layout, bank_id=f"bank{i}")
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    }


def path_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
