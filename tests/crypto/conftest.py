"""Shared crypto fixtures: one key ceremony per test session (keygen ~20 ms, loading ~10 ms)."""

from __future__ import annotations

import pytest

from crypto import CkksKey, KeyFiles, keygen, load_public_context, load_secret_context


@pytest.fixture(scope="session")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def secret_key(key_files: KeyFiles) -> CkksKey:
    return load_secret_context(key_files.secret_path)


@pytest.fixture(scope="session")
def public_key(key_files: KeyFiles) -> CkksKey:
    return load_public_context(key_files.public_path)


@pytest.fixture(scope="session")
def other_key_files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    """A second job's keys: same parameters, different key."""
    return keygen(tmp_path_factory.mktemp("other_keys"))
