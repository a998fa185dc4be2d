"""Per-rank random-generator state: saved with every checkpoint so dropout and sampling resume exactly.

Each rank draws from its own streams (dropout masks differ across data-parallel ranks), so each
rank saves its own file. When the number of ranks changes, rank r takes rank r's file if the old
run had a rank r; a rank that did not exist before keeps the state the trainer seeded it with.
Copying another rank's file instead would give two ranks identical dropout masks, which is worse
than fresh streams; an exact replay is impossible anyway once the data sharding has changed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The state of every generator this process uses."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only the current device: one rank drives one GPU.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_file(step_dir: str | Path, rank: int) -> Path:
    return Path(step_dir) / "rng" / f"rank-{rank}.pt"


def save(step_dir: str | Path, rank: int) -> Path:
    """Write this rank's generator states; returns the file (already fsynced)."""
    path = rank_file(step_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(capture(), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(step_dir: str | Path, rank: int) -> bool:
    """Restore this rank's generators from ``step_dir``; False when the checkpoint had no such rank."""
    path = rank_file(step_dir, rank)
    if not path.is_file():
        return False
    # weights_only=False: the python and numpy states are tuples holding numpy arrays and strings.
    restore(torch.load(path, weights_only=False))
    return True
