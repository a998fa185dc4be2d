"""Model FLOPs of a T5 training step, for achieved TFLOP/s and MFU.

Counts matmul FLOPs only (2 per multiply-add), forward x 3 for forward + backward, and ignores
the recomputation that activation checkpointing adds: this is *model* FLOPs utilisation as in
the PaLM paper, so turning checkpointing on lowers MFU rather than hiding its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int
    gated_ffn: bool


def shape_of(config) -> T5Shape:
    """Pull the dimensions out of our T5Config (or anything with the same attribute names)."""
    return T5Shape(
        d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff, num_heads=config.num_heads,
        num_layers=config.num_layers,
        num_decoder_layers=getattr(config, "num_decoder_layers", None) or config.num_layers,
        vocab_size=config.vocab_size, gated_ffn=config.is_gated,
    )


def forward_flops(shape: T5Shape, batch: int, enc_len: int, dec_len: int, prompt_len: int = 0) -> float:
    """Forward matmul FLOPs for ``batch`` sequences of the given (padded) lengths.

    ``prompt_len`` key/value prompt slots per self-attention add to the attended length only.
    """
    inner = shape.num_heads * shape.d_kv
    qkvo = 4 * shape.d_model * inner
    ffn = (3 if shape.gated_ffn else 2) * shape.d_model * shape.d_ff
    enc_tokens, dec_tokens = batch * enc_len, batch * dec_len
    enc = shape.num_layers * (
        enc_tokens * (qkvo + ffn)  # projections
        + 2 * enc_tokens * (enc_len + prompt_len) * inner  # QK^T and AV
    )
    dec = shape.num_decoder_layers * (
        dec_tokens * (qkvo + ffn)
        + 2 * dec_tokens * (dec_len + prompt_len) * inner  # self-attention (causal counted full)
        + dec_tokens * 2 * shape.d_model * inner  # cross-attention Q and O
        + enc_tokens * 2 * shape.d_model * inner  # cross-attention K and V
        + 2 * dec_tokens * enc_len * inner
    )
    lm_head = dec_tokens * shape.d_model * shape.vocab_size
    return 2.0 * (enc + dec + lm_head)


def train_step_flops(shape: T5Shape, batch: int, enc_len: int, dec_len: int, prompt_len: int = 0) -> float:
    return 3.0 * forward_flops(shape, batch, enc_len, dec_len, prompt_len)


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, for the MFU estimate on known cards.
GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def device_peak_tflops() -> float | None:
    """The bf16 peak of the current CUDA device, or None when unknown (then MFU is not logged)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in GPU_PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None
