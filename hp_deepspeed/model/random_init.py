"""Random initialisation that gives the same weights for the same seed on every build path.

A parameter created inside ``deepspeed.zero.Init`` on a GPU lives on CUDA, and ``nn.init``
would draw its values from the CUDA generator, while a CPU build draws from the CPU one: the
same seed then gives different weights. Worse, the stream depends on which modules' default
initialisers ran on which device first. Every random initial value of the model is therefore
drawn here, on the CPU, in fp32, from one generator seeded per build (:func:`seeded`), and
copied into the parameter, whatever its device and dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

_generator: torch.Generator | None = None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw the initial values of the parameters created in this block from ``seed`` alone."""
    global _generator
    previous, _generator = _generator, torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        _generator = previous


@torch.no_grad()
def normal_(param: Tensor, std: float) -> None:
    """Fill ``param`` with N(0, std^2) drawn on the CPU (the global CPU generator outside
    :func:`seeded`). Meta tensors have no values and are skipped."""
    if param.is_meta:
        return
    values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=_generator)
    param.copy_(values)
