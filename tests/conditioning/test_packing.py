"""Packed rows (``data.packing``) change the layout of a batch, never its math: per variant, the
per-token losses, per-example sums and gradients of a packed batch equal the unpacked batch's,
and a segment never sees another segment's tokens or prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hp_deepspeed.model.conditioning import PER_EXAMPLE_VARIANTS
from tests.conditioning.common import pack, random_batch, tiny_model

PACKED_VARIANTS = ["none", "mtl", "kv_prompt", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global"]


def unpacked_batch(batch_size: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    return random_batch(batch_size, seed=seed)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="none").view(labels.shape)


@pytest.mark.parametrize("variant", PACKED_VARIANTS)
def test_a_packed_batch_has_the_unpacked_losses_and_gradients(variant):
    torch.manual_seed(0)
    model = tiny_model(variant).float()
    batch = unpacked_batch()
    packed, layout, tgt_len = pack(batch)
    assert layout.rows < len(tgt_len) and layout.segments >= 2  # really packed

    # Gradients of the mean token loss, the trainer's objective (it divides by the token count).
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    packed_out = model(**packed)
    packed_out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    unpacked_tokens = token_losses(out.logits, batch["labels"])
    packed_tokens = token_losses(packed_out.logits, packed["labels"])
    slot = layout.row * layout.segments + layout.segment - 1  # each example's entry of the per-segment outputs
    for i in range(len(tgt_len)):
        start = layout.target_start[i]
        mine = packed_tokens[layout.row[i], start:start + tgt_len[i]]
        # losses of ~10 nats at random init: 1e-5 absolute is fp32's rounding there, hence rtol too
        torch.testing.assert_close(mine, unpacked_tokens[i, :tgt_len[i]], rtol=2e-6, atol=1e-5)
    # sums of ~100 nats: fp32 rounding of a different summation order, relative
    torch.testing.assert_close(packed_out.example_loss_sum[slot], out.example_loss_sum, rtol=1e-6, atol=1e-5)
    assert torch.equal(packed_out.example_token_count[slot], out.example_token_count)
    assert int(packed_out.example_token_count.sum()) == int(tgt_len.sum())  # empty slots count nothing
    torch.testing.assert_close(packed_out.loss, out.loss, rtol=1e-6, atol=1e-6)
    # Empty slots' prompts (task 0's) get exactly zero gradient, so the parameter sets agree.
    assert set(packed_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def two_segment_row(packed, layout):
    """A row holding at least two segments, and the example of its first and second segment."""
    for row in range(layout.rows):
        first = np.flatnonzero((layout.row == row) & (layout.segment == 1))
        second = np.flatnonzero((layout.row == row) & (layout.segment == 2))
        if len(first) and len(second):
            return row, int(first[0]), int(second[0])
    raise AssertionError("no row has two segments")


@pytest.mark.parametrize("variant", ["none", "hyperprompt_global", "kv_prompt"])
def test_a_segment_never_sees_another_segments_tokens_or_prompts(variant):
    model = tiny_model(variant).float().eval()
    packed, layout, tgt_len = pack(unpacked_batch())
    row, first, second = two_segment_row(packed, layout)
    changed = {k: v.clone() for k, v in packed.items()}
    # New input and target tokens for the second segment, and another task for it.
    in_seg, tgt_seg = changed["input_segment_ids"][row] == 2, changed["target_segment_ids"][row] == 2
    changed["input_ids"][row, in_seg] = (changed["input_ids"][row, in_seg] + 7) % 90 + 2
    changed["labels"][row, tgt_seg] = (changed["labels"][row, tgt_seg] + 11) % 90 + 2
    changed["segment_task_ids"][row, 1] = (changed["segment_task_ids"][row, 1] + 1) % 4
    with torch.no_grad():
        before = model(**packed).logits
        after = model(**changed).logits
    start = layout.target_start[first]
    mine = slice(start, start + tgt_len[first])
    torch.testing.assert_close(after[row, mine], before[row, mine], rtol=0, atol=1e-6)
    # ... while the changed segment's own logits did change (the change reached the model)
    start = layout.target_start[second]
    assert not torch.allclose(after[row, start:start + tgt_len[second]], before[row, start:start + tgt_len[second]])


@pytest.mark.parametrize("is_decoder", [False, True])
def test_the_relative_position_bias_within_a_segment_is_that_of_the_example_alone(is_decoder):
    model = tiny_model("none").float()
    stack = model.backbone.decoder if is_decoder else model.backbone.encoder
    row_length, offset, length = 40, 13, 9
    packed = stack.position_bias(row_length, row_length, 0, torch.device("cpu"))
    alone = stack.position_bias(length, length, 0, torch.device("cpu"))
    assert torch.equal(packed[..., offset:offset + length, offset:offset + length], alone)


def test_each_segment_starts_its_decoder_inputs_with_the_start_token():
    model = tiny_model("none")
    labels = torch.tensor([[5, 6, 7, 8, 9, -100]])
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    start = model.config.decoder_start_token_id
    assert model.backbone.shift_right(labels, segments).tolist() == [[start, 5, start, 7, 8, start]]


@pytest.mark.parametrize("variant", PER_EXAMPLE_VARIANTS)
def test_variants_that_condition_whole_rows_refuse_packed_rows(variant):
    model = tiny_model(variant).float()
    packed, _, _ = pack(unpacked_batch())
    with pytest.raises(ValueError, match="packed rows cannot"):
        model(**packed)
