"""Crash-safe files: temp file in the same folder, fsync, rename, then fsync the folder.

A crash therefore leaves the old file or the whole new one, never half of either, and the
rename itself survives a power cut (the directory entry is fsynced too).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal


def fsync_dir(folder: Path) -> None:
    """Make a rename/create inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is fsynced and renamed over `path`.

    For writers that want a file name (safetensors, matplotlib). On error the temp file is removed
    and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, mode)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode=mode)


def atomic_write_with(path: Path, write: Callable[[Path], None], *, mode: int = 0o644) -> Path:
    """Atomic write through a callback that writes to the temp path it is given."""
    with atomic_path(path, mode=mode) as tmp:
        write(tmp)
    return Path(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_document(
    path: str | Path,
    error: Callable[[str], Exception],
    *,
    fmt: Literal["json", "toml"] = "json",
    where: str | None = None,
    missing: str = "not found",
) -> Any:
    """A JSON or TOML file, parsed; a missing file or bad syntax raises `error(message)`.

    Every message starts with `where` (default: the path), so a user reading it knows which file
    to fix: `<where>: <missing>`, `<where>: invalid JSON at line N: ...`, `<where>: not valid TOML (...)`.
    """
    path = Path(path)
    where = str(path) if where is None else where
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except FileNotFoundError:
        raise error(f"{where}: {missing}") from None
    except json.JSONDecodeError as err:
        raise error(f"{where}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{where}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text ({err})") from None


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, *, wait: bool = True) -> Iterator[bool]:
    """An advisory exclusive lock (flock) on `lock_file`, held for the `with` block.

    Yields True when held. With wait=False a lock held by someone else yields False at once
    (the caller decides what to do) instead of blocking.
    """
    import fcntl  # POSIX only; imported here so the rest of the module stays portable

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
