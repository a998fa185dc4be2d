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


def test_layer_norm_is_transformers_t5_layer_norm():
    """T5LayerNorm runs torch's rms_norm (one fused CUDA kernel); values and gradients stay those
    of transformers' T5LayerNorm: fp32 statistics, rounding to a half-precision weight's dtype
    before the scale."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm as HFLayerNorm

    from hp_deepspeed.model.t5 import T5LayerNorm

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, dict(rtol=1e-6, atol=1e-6)), (torch.bfloat16, dict(rtol=1e-2, atol=1e-2))):
        ours, hf = T5LayerNorm(64, 1e-6).to(dtype), HFLayerNorm(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            ours.weight.copy_(torch.randn(64))
            hf.weight.copy_(ours.weight)
        x = (torch.randn(3, 5, 64) * 30).to(dtype).requires_grad_()
        x_hf = x.detach().clone().requires_grad_()
        out, out_hf = ours(x), hf(x_hf)
        assert out.dtype == out_hf.dtype == dtype
        torch.testing.assert_close(out, out_hf, **tol)
        out.float().square().sum().backward()
        out_hf.float().square().sum().backward()
        torch.testing.assert_close(x.grad, x_hf.grad, **tol)
        torch.testing.assert_close(ours.weight.grad, hf.weight.grad, **tol)
