"""Session fixture: tiny random HF checkpoints, written once by transformers and reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from hp_deepspeed.testing.tiny_models import make_tiny_hf_checkpoint

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(preset, fmt)`` -> folder of a checkpoint written by transformers (cached)."""
    made: dict[tuple[str, str], Path] = {}

    def make(preset: str, fmt: str = "safetensors") -> Path:
        if (preset, fmt) not in made:
            folder = tmp_path_factory.mktemp(f"{preset}-{fmt}")
            made[(preset, fmt)] = make_tiny_hf_checkpoint(folder, preset, seed=1234, fmt=fmt)
        return made[(preset, fmt)]

    return make
