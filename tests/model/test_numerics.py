"""Numerical safeguards of the backbone outside float32."""

from __future__ import annotations

import torch

from hp_deepspeed.model import LayerConditioning
from tests.model.helpers import load_ours


def test_float16_residual_stream_stays_finite(tiny_checkpoint):
    """Residual values near float16's limit would overflow to inf in the next residual add."""
    model = load_ours(tiny_checkpoint("tiny-v1_0")).half()
    block = model.encoder.block[1]
    with torch.no_grad():
        block.layer[0].SelfAttention.o.weight.mul_(1000.0)  # an attention output in the thousands
    hidden = torch.full((1, 4, model.config.d_model), 65000.0, dtype=torch.float16)
    bias = torch.zeros(1, model.config.num_heads, 4, 4, dtype=torch.float16)
    with torch.no_grad():
        out = block(hidden, bias, None, None, *LayerConditioning().as_args())
    assert torch.isfinite(out).all()
