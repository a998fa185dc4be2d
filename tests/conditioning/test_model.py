"""HyperPromptT5 on the tiny backbone: identity when off, gradients, per-example independence,
precomputed prompts and generation."""

import pytest
import torch

from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.builder import build_backbone
from hp_deepspeed.model.conditioning import PrecomputedConditioning

from .common import CONDITIONED_VARIANTS, NUM_TASKS, example, random_batch, tiny_model


@pytest.mark.parametrize("preset", ["tiny-v1_0", "tiny-v1_1"])
def test_no_conditioning_is_exactly_the_backbone(preset):
    model = tiny_model("none", preset)
    backbone = build_backbone(ModelConfig(name_or_path=preset, dropout_rate=0.0, seed=0))
    assert model.conditioning is None and model.kv_prompt_length == 0
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in backbone.parameters())
    batch = random_batch(6)
    out = model(**batch)
    ref = backbone(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(model.backbone.named_parameters(), backbone.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("variant", CONDITIONED_VARIANTS)
@pytest.mark.parametrize("freeze", [False, True])
def test_every_conditioning_parameter_gets_a_gradient(variant, freeze):
    model = tiny_model(variant, freeze_backbone=freeze)
    # Task 3 is absent: the rows of task-indexed tables that belong to it must get none.
    out = model(**random_batch(8, task_ids=[0, 1, 2, 0, 1, 2, 2, 0]))
    out.loss.backward()
    task_indexed = {"generator.prompts", "generator.global_prompts", "generator.task_layer_embedding.task_embedding"}
    if variant == "hyperprompt_sep":
        task_indexed |= {"generator.down", "generator.up"}
    for name, param in model.conditioning.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        if name in task_indexed:
            assert param.shape[0] == NUM_TASKS, name
            assert param.grad[3].abs().sum() == 0, name
            assert all(param.grad[t].abs().sum() > 0 for t in range(3)), name
    for name, param in model.backbone.named_parameters():
        assert (param.grad is None) == freeze, name


@pytest.mark.parametrize("variant", CONDITIONED_VARIANTS)
def test_mixed_task_batch_equals_each_example_alone(variant):
    model = tiny_model(variant).eval()
    batch = random_batch(7, task_ids=[3, 0, 3, 1, 2, 0, 3], seed=1)
    calls = []
    model.conditioning.generator.register_forward_hook(lambda mod, args, out: calls.append(args[0].tolist()))
    with torch.no_grad():
        mixed = model(**batch)
        assert calls == [[0, 1, 2, 3]]  # one generation per forward, for the distinct tasks
        for i in range(7):
            alone = model(**example(batch, i))
            tgt = alone.logits.shape[1]
            torch.testing.assert_close(mixed.logits[i, :tgt], alone.logits[0], rtol=1e-4, atol=5e-5)
            torch.testing.assert_close(mixed.example_loss_sum[i], alone.example_loss_sum[0], rtol=1e-4, atol=5e-5)
    # ... and the task matters: the same example under another task gives other logits.
    other = example(batch, 0) | {"task_ids": torch.tensor([1])}
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, model(**example(batch, 0)).logits, atol=1e-4)


@pytest.mark.parametrize("variant", CONDITIONED_VARIANTS)
def test_precomputed_prompts_give_the_same_logits_and_generations(variant, tmp_path):
    model = tiny_model(variant).eval()
    batch = random_batch(6, task_ids=[2, 0, 2, 3, 1, 1], seed=2)
    path = tmp_path / "conditioning.safetensors"
    model.precompute().save(path)
    served = model.with_conditioning(PrecomputedConditioning.load(path))
    calls = []
    model.conditioning.generator.register_forward_hook(lambda mod, args, out: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, model(**batch).logits, rtol=0, atol=0)
        calls.clear()
        generated = model.generate(batch["input_ids"], batch["attention_mask"], batch["task_ids"], max_new_tokens=5)
        assert len(calls) == 1  # conditioning computed once for the whole decode
        assert torch.equal(served.generate(batch["input_ids"], batch["attention_mask"], batch["task_ids"], 5), generated)
    assert generated.shape[0] == 6 and 1 < generated.shape[1] <= 6


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    batch = random_batch(5, seed=3)
    grads = {}
    for ckpt in ("none", mode):
        model = tiny_model("hyperprompt_global", activation_checkpointing=ckpt).train()
        model(**batch).loss.backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], grad, rtol=1e-5, atol=1e-5, msg=name)
