"""Through the real `deepspeed` launcher, 2 ranks, ZeRO-3, fp32 on the CPU: the losses and the
updated weights after a few AdamW steps equal a single-process plain PyTorch run of the same
model on the same global batches, with activation checkpointing off, reentrant and
non-reentrant, for HyperPrompt-Global and the HyperFormer++ baseline (and Global with a frozen
backbone, the case DeepSpeed < 0.19.3 crashes on under non-reentrant checkpointing), and for
HyperPrompt-Share, -Sep, kv_prompt and prompt_tuning, with different tasks on each rank; and
for Global and kv_prompt fed packed rows (data.packing), against the same unpacked reference.

One launcher run trains every case in sequence (tests/scripts/cond_zero3_train.py); the plain
reference runs here. DeepSpeed averages the ranks' gradients, so the plain loss is the mean of
the two halves' token-mean losses: the same objective, computed on the full batch at once.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hp_deepspeed.model.hyperprompt_t5 import build_model
from hp_deepspeed.testing.ranks import free_port, run_command

from . import zero3_cases as cases

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cond_zero3_train.py"


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    run = run_command(
        ["deepspeed", "--num_gpus", str(cases.WORLD_SIZE), "--master_port", str(free_port()),
         str(SCRIPT), "--out", str(out)],
        timeout=540,
    )
    assert (out / "losses.json").is_file(), run.output[-3000:]
    return out


def plain_run(variant: str, ckpt: str, frozen: bool):
    """The reference: one process, the full global batch, torch.optim.AdamW."""
    model_cfg, cond_cfg = cases.configs(variant, ckpt, frozen)
    model = build_model(model_cfg, cond_cfg, num_tasks=4).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **cases.ADAMW)
    losses = []
    for step in range(cases.STEPS):
        batch = cases.global_batch(step)
        out = model(**batch)
        halves = [
            out.example_loss_sum[r * cases.MICRO_BATCH:(r + 1) * cases.MICRO_BATCH].sum()
            / out.example_token_count[r * cases.MICRO_BATCH:(r + 1) * cases.MICRO_BATCH].sum()
            for r in range(cases.WORLD_SIZE)
        ]
        loss = torch.stack(halves).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return initial, {n: p.detach() for n, p in model.named_parameters()}, losses


@pytest.mark.parametrize("case", cases.CASES, ids=[c[0] for c in cases.CASES])
def test_zero3_training_equals_plain_pytorch(zero3_run, case):
    name, variant, ckpt, frozen, compiled, leaf = case
    initial, final, losses = plain_run(variant, ckpt, frozen)  # the reference is always eager
    ds_losses = json.loads((zero3_run / "losses.json").read_text())[name]
    assert (json.loads((zero3_run / "graphs.json").read_text())[name] > 0) == compiled
    # tiny-v1_0 has 2 encoder and 3 decoder blocks; each stack's first keeps per-module hooks.
    assert json.loads((zero3_run / "leaves.json").read_text())[name] == (3 if leaf else 0)
    ds_final = load_file(str(zero3_run / f"{name}.final.safetensors"))
    torch.testing.assert_close(torch.tensor(ds_losses), torch.tensor(losses), rtol=1e-5, atol=0)
    # fp32 tolerance: Adam divides by sqrt(v), so rounding differences between the two
    # reduction orders grow to ~1e-4 of the weights in 3 steps; running the plain model on the
    # two halves with accumulated gradients instead of the full batch differs from it as much.
    # A real discrepancy (a rank's gradient lost, a task's prompts mixed up) moves weights by
    # the size of an update, lr = 1e-2, a hundred times more.
    assert ds_final.keys() == final.keys()
    for n, p in final.items():
        torch.testing.assert_close(ds_final[n], p, rtol=1e-4, atol=2e-4, msg=n)
        if frozen and n.startswith("backbone."):
            assert torch.equal(ds_final[n], initial[n]), n
        else:  # the comparison only means something if training moved every trainable weight
            assert (p - initial[n]).abs().max() > 10 * 2e-4, n


@pytest.mark.parametrize("case", cases.PACKED_CASES, ids=[c[0] for c in cases.PACKED_CASES])
def test_zero3_training_on_packed_rows_equals_plain_pytorch_on_the_examples(zero3_run, case):
    """Each rank's half as packed rows (data.packing), ZeRO-3: the losses and weights of the
    plain, unpacked reference (the tolerances of the test above)."""
    name, variant, ckpt = case
    _, final, losses = plain_run(variant, ckpt, False)
    ds_losses = json.loads((zero3_run / "losses.json").read_text())[name]
    torch.testing.assert_close(torch.tensor(ds_losses), torch.tensor(losses), rtol=1e-5, atol=0)
    ds_final = load_file(str(zero3_run / f"{name}.final.safetensors"))
    assert ds_final.keys() == final.keys()
    for n, p in final.items():
        torch.testing.assert_close(ds_final[n], p, rtol=1e-4, atol=2e-4, msg=n)


@pytest.mark.parametrize("variant", cases.ZERO_INIT_VARIANTS)
def test_zero_init_builds_the_same_conditioning(zero3_run, variant):
    """build_model(..., ds_config) creates the conditioning inside deepspeed.zero.Init (every
    rank holds only its partition); gathered, it is exactly the plainly built one, in fp32."""
    plain = build_model(*cases.configs(variant, "none", False), num_tasks=4)
    zero_init = load_file(str(zero3_run / f"zero_init.{variant}.safetensors"))
    for n, p in plain.conditioning.named_parameters(prefix="conditioning"):
        assert zero_init[n].dtype == torch.float32, n
        assert torch.equal(zero_init[n], p), n
