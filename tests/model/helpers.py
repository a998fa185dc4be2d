"""Helpers shared by the model tests (importable from rank processes, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

import torch

from hp_deepspeed.model import T5Config, T5Model, load_hf_weights

# The two families: v1.0 (ReLU FFN, tied and scaled lm_head) and v1.1 (gated GELU, untied).
FAMILIES = ("tiny-v1_0", "tiny-v1_1")


def load_ours(folder: Path, **overrides) -> T5Model:
    """Our model with the checkpoint's weights, fp32, eval mode."""
    config = T5Config.from_pretrained(folder)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = T5Model(config)
    load_hf_weights(model, folder, zero3=False)
    return model.eval()


def padded_batch(seed: int = 0, vocab: int = 96):
    """Inputs with right padding (one example mostly padding) and labels with -100 tails."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (3, 13), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[2, 2:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(2, vocab, (3, 7), generator=gen)
    labels[0, 5:] = -100
    labels[2, 2:] = -100
    return input_ids, attention_mask, labels
