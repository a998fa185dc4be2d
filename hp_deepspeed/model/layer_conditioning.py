"""What a task-conditioning module hands the T5 backbone.

The conditioning module (HyperPrompt or a baseline) is called once per forward, before the
encoder, and returns a ``ConditioningOutput``. The backbone then passes each block its
``LayerConditioning`` tensors as explicit positional arguments. Keeping generation outside the
blocks matters for two reasons seen in practice: ZeRO-3 gathers the hypernetwork's parameters
through its normal module hooks exactly once, and activation checkpointing (reentrant or not)
recomputes a block from its arguments, so gradients still flow back to the hypernetworks.

Every tensor here is already per example (batch dimension first): the conditioning module
computes one set per distinct task in the batch and gathers it to the examples.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


# Both types are NamedTuples because DeepSpeed's ZeRO-3 module hooks walk tuples, lists and
# dicts to find the tensors a module takes and returns; a dataclass is opaque to them ("A module
# has unknown inputs or outputs type") and its tensors would escape the hooks.
class LayerConditioning(NamedTuple):
    """Per-block conditioning tensors; ``None`` means that part is switched off."""

    key_prompt: Tensor | None = None
    """[batch, heads, prompt_len, d_kv]: prepended to the keys of the block's self-attention."""
    value_prompt: Tensor | None = None
    """[batch, heads, prompt_len, d_kv]: prepended to the values of the block's self-attention."""
    adapter_down: Tensor | None = None
    """[batch, d_model, bottleneck]: generated adapter down-projection (HyperFormer++)."""
    adapter_down_bias: Tensor | None = None
    """[batch, bottleneck]"""
    adapter_up: Tensor | None = None
    """[batch, bottleneck, d_model]: generated adapter up-projection."""
    adapter_up_bias: Tensor | None = None
    """[batch, d_model]"""

    def as_args(self) -> tuple[Tensor | None, ...]:
        """Flat positional form, so a checkpointed block sees every tensor as an argument."""
        return tuple(self)


class ConditioningOutput(NamedTuple):
    """Everything one forward's conditioning produces."""

    input_prompt: Tensor | None = None
    """[batch, prompt_len, d_model]: soft prompt prepended to the encoder's input embeddings
    (Prompt-Tuning). Its slots are always attended to."""
    encoder: list[LayerConditioning] | None = None
    """One entry per encoder block, or ``None`` for an unconditioned encoder."""
    decoder: list[LayerConditioning] | None = None
    """One entry per decoder block, or ``None`` for an unconditioned decoder."""


def apply_adapter(hidden: Tensor, cond: LayerConditioning | None) -> Tensor:
    """Residual bottleneck adapter with per-example weights: ``h + U(relu(D(h)))``.

    Applied by each block to its feed-forward sub-layer output, before the block's residual add
    (the Houlsby / HyperFormer placement). ``hidden`` is [batch, seq, d_model].
    """
    if cond is None or cond.adapter_down is None:
        return hidden
    down = torch.baddbmm(cond.adapter_down_bias.unsqueeze(1), hidden, cond.adapter_down)
    up = torch.baddbmm(cond.adapter_up_bias.unsqueeze(1), torch.relu(down), cond.adapter_up)
    return hidden + up
