"""Shared fixtures for the data pipeline tests: one prepared Shakespeare cache per session, in a temp folder."""

import pytest

from hybrid_lm.data import DataConfig, prepare_data


@pytest.fixture(scope="session")
def shakespeare_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shakespeare_cache")


@pytest.fixture(scope="session")
def shakespeare(shakespeare_cache):
    return prepare_data(DataConfig(source="shakespeare", cache_dir=str(shakespeare_cache)))


@pytest.fixture(autouse=True)
def _no_default_cache(monkeypatch, tmp_path):
    # a test that forgets cache_dir must not write into the user's ~/.cache
    monkeypatch.setenv("HYBRID_LM_CACHE", str(tmp_path / "env_cache"))
