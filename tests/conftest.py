"""Test-wide isolation: the content-hash cache of corpus fingerprints lives in a temporary folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_hash_cache(tmp_path_factory, monkeypatch):
    from emotion_neurons.config import HASH_CACHE_ENV, clear_caches

    folder = tmp_path_factory.mktemp("hash-cache")  # one per test, so no test sees another's digests
    monkeypatch.setenv(HASH_CACHE_ENV, str(folder / "content-hashes.json"))
    clear_caches()
    yield
    clear_caches()
