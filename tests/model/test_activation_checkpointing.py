"""Per-block activation checkpointing: same gradients, for parameters and conditioning tensors."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import FAMILIES, conditioning_leaves, load_ours, padded_batch, random_conditioning


def gradients(model, mode: str):
    """Gradients of params and conditioning tensors, and how many block forwards ran."""
    model.set_activation_checkpointing(mode)
    model.train()  # dropout on: checkpointing must replay the same dropout masks
    model.zero_grad(set_to_none=True)
    conditioning = random_conditioning(model.config, batch=3, adapter_dim=4, input_prompt_len=2, requires_grad=True)
    calls = []
    # A pre-hook: non-reentrant recomputation stops early, before forward post-hooks would run.
    handles = [block.register_forward_pre_hook(lambda *_: calls.append(1)) for block in model.decoder.block]
    input_ids, attention_mask, labels = padded_batch()
    torch.manual_seed(0)
    model(input_ids, attention_mask, labels=labels, conditioning=conditioning).loss.backward()
    for handle in handles:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads.update({f"conditioning.{i}": t.grad.clone() for i, t in enumerate(conditioning_leaves(conditioning))})
    return grads, len(calls)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_checkpointed_gradients_equal_plain(tiny_checkpoint, preset, mode):
    model = load_ours(tiny_checkpoint(preset))
    assert model.config.dropout_rate > 0
    reference, plain_calls = gradients(model, "none")
    grads, calls = gradients(model, mode)
    assert calls == 2 * plain_calls  # every block really was recomputed in backward
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
