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


def random_conditioning(
    config: T5Config,
    batch: int,
    prompt_len: int = 3,
    adapter_dim: int = 0,
    input_prompt_len: int = 0,
    seed: int = 0,
    requires_grad: bool = False,
):
    """A ConditioningOutput with random key/value prompts in every block of both stacks,
    optionally adapters (``adapter_dim`` > 0) and a soft input prompt; all leaves."""
    from hp_deepspeed.model import ConditioningOutput, LayerConditioning

    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(requires_grad)

    def layer():
        kwargs = {}
        if prompt_len:
            kwargs.update(key_prompt=leaf(batch, config.num_heads, prompt_len, config.d_kv),
                          value_prompt=leaf(batch, config.num_heads, prompt_len, config.d_kv))
        if adapter_dim:
            sites = 2  # after self-attention, after the FFN
            kwargs.update(adapter_down=leaf(batch, sites, config.d_model, adapter_dim, scale=0.3),
                          adapter_down_bias=leaf(batch, sites, adapter_dim, scale=0.1),
                          adapter_up=leaf(batch, sites, adapter_dim, config.d_model, scale=0.3),
                          adapter_up_bias=leaf(batch, sites, config.d_model, scale=0.1),
                          adapter_norm_weight=leaf(batch, sites, config.d_model, scale=0.5),
                          adapter_norm_bias=leaf(batch, sites, config.d_model, scale=0.1))
        return LayerConditioning(**kwargs)

    return ConditioningOutput(
        input_prompt=leaf(batch, input_prompt_len, config.d_model) if input_prompt_len else None,
        encoder=[layer() for _ in range(config.num_layers)],
        decoder=[layer() for _ in range(config.num_decoder_layers)],
    )


def conditioning_leaves(conditioning) -> list[torch.Tensor]:
    """Every tensor of a ConditioningOutput, in a fixed order."""
    leaves = [conditioning.input_prompt] if conditioning.input_prompt is not None else []
    for layer in conditioning.encoder + conditioning.decoder:
        leaves.extend(t for t in layer.as_args() if t is not None)
    return leaves
