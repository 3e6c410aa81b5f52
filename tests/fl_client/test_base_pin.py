"""The base checkpoint's pin: `checkpoint_fingerprint` against hashlib over the files, kept per
file identity in a warm process, and a copy that differs from the pin is refused before training."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fedmoe.fl_client import task
from fedmoe.fl_client.task import build_model, checkpoint_fingerprint
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError


def reference_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3 << 20))  # spans several 1 MiB reads
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def test_fingerprint_is_hashed_once_per_identity_and_again_after_any_change(checkpoint, monkeypatch):
    hashed = []
    real_sha256 = hashlib.sha256

    def counting_sha256(*args):
        hashed.append(1)
        return real_sha256(*args)

    monkeypatch.setattr(task.hashlib, "sha256", counting_sha256)
    first = checkpoint_fingerprint(checkpoint)
    assert first == reference_digest(checkpoint) and len(hashed) == 2  # ours + the reference's
    assert checkpoint_fingerprint(str(checkpoint)) == first and len(hashed) == 2  # a warm process: kept

    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # same size; mtime put back below
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = checkpoint_fingerprint(checkpoint)
    assert changed != first and changed == reference_digest(checkpoint)  # ctime moved: hashed again


def test_a_copy_that_differs_from_the_pin_is_refused(checkpoint):
    pinned = JobConfig(base_checkpoint=str(checkpoint), base_checkpoint_sha256=reference_digest(checkpoint))
    (checkpoint / "config.json").write_text('{"hidden_size": 9}')
    with pytest.raises(ConfigError, match="content hash .* 'base-checkpoint-sha256' .* refusing to train"):
        build_model(pinned)
    with pytest.raises(ConfigError, match="expected a folder"):
        checkpoint_fingerprint(checkpoint / "missing")
