"""Shared crypto fixtures: one key ceremony per test session (keygen ~20 ms, loading ~10 ms)."""

from __future__ import annotations

import pytest

from fedmoe.crypto import CkksKey, KeyFiles, keygen, load_public_context, load_secret_context


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


# ---- secure aggregation (fedmoe/crypto/secagg): BFV keys and bank identities, made once per session


@pytest.fixture(scope="session")
def bfv_files(tmp_path_factory: pytest.TempPathFactory):
    from fedmoe.crypto.secagg.bfv_secret import bfv_keygen

    return bfv_keygen(tmp_path_factory.mktemp("bfv"))


@pytest.fixture(scope="session")
def bfv_secret(bfv_files):
    from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret

    return load_bfv_secret(bfv_files.secret_path)


@pytest.fixture(scope="session")
def bfv_public(bfv_files):
    from fedmoe.crypto.secagg.bfv import load_bfv_public

    return load_bfv_public(bfv_files.public_path)


@pytest.fixture(scope="session")
def identities(tmp_path_factory: pytest.TempPathFactory):
    """Eight bank identities (bank0..bank7) and their pins."""
    from fedmoe.crypto.identity import ConsortiumPins, generate_identity

    folder = tmp_path_factory.mktemp("ids")
    ids = [generate_identity(folder / f"bank{i}.identity.secret", f"bank{i}") for i in range(8)]
    return ids, ConsortiumPins.from_identities(ids)
