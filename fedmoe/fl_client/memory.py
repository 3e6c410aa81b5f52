"""The training process's allocator: reuse what a step freed instead of faulting in fresh pages.

glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised as big blocks are
freed, at most 32 MiB) with a fresh `mmap` and unmaps it on free, and it trims the heap's top
above 128 KiB. Every step of training allocates the same large temporaries again (activations,
gathered expert rows, per-sample gradients), so every step faulted in and zeroed fresh pages: one
DP-SGD step of FFA-LoRA on the `small` preset took 36,600 minor faults (~110 MB) and 75 ms of
system time, a non-private step 8,300 and 16 ms (docs/performance.md, session 10).

`reused_memory()` sets the mmap threshold to its maximum and turns trimming off while a bank
trains, so a step's blocks come from what the previous step freed (2 and 760 faults per step),
then hands the kept memory back with `malloc_trim(0)`. Both settings go together: setting either
alone (also through MALLOC_TRIM_THRESHOLD_ and friends) freezes the dynamic threshold at 128 KiB,
and trimming off alone made a step 2.3x slower. The settings stay for the process once made
(glibc has no way back to the dynamic threshold); between rounds the memory is trimmed.

Not glibc (macOS, musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_NO_TRIM = 2**31 - 1  # mallopt takes an int


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


@cache
def keep_freed_memory() -> bool:
    """Sets glibc's mmap threshold to 32 MiB and turns heap trimming off, once per process.

    Returns:
        True when both settings took effect (glibc), else False (nothing changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1
    logger.debug("malloc: mmap threshold 32 MiB, no trimming: %s", ok)
    return ok


def release_freed_memory() -> None:
    """Hands the memory malloc keeps back to the OS (glibc's malloc_trim(0)); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def reused_memory() -> Iterator[None]:
    """Around a training loop: freed blocks are reused within it, and given back when it ends."""
    keep_freed_memory()
    try:
        yield
    finally:
        release_freed_memory()
