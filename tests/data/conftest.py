"""Shared fixtures: the bundled tokenizer and one tokenisation cache for the whole session."""

from __future__ import annotations

import os

# The data tests run offline, as the demo does: set before datasets/transformers are imported
# (hp_deepspeed.data imports them lazily), since both read these variables at import time.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from hp_deepspeed.data import DataConfig, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def make_cfg(session_cache):
    """DataConfig over the bundled data with the session cache (tests may override fields)."""

    def make(**kwargs) -> DataConfig:
        kwargs.setdefault("cache_dir", session_cache)
        return DataConfig(**kwargs)

    return make
