"""The trainer's loss is the mean token loss of the whole global batch, however it is split.

``Trainer.train_step`` divides each micro-batch's summed token loss by the global batch's
target-token count, all-reduced over ranks. Here two ranks whose halves hold very different
numbers of target tokens train the same tiny model as one rank that sees the whole global batch
in each micro-batch, under plain PyTorch data parallelism (ZeRO stage 0), ZeRO-2 and ZeRO-3,
with gradient accumulation 1 and 2: the weights must agree to fp32 rounding. Dividing by a
rank's own token count instead weighs the short-target rank's tokens several times more, which
moves the weights by a large fraction of an update.

The real ``Trainer.train_step`` runs on a stand-in trainer holding only what it reads (the
engine, the config values, the device), so the test exercises the trainer's own code without
its data pipeline. Plain SGD keeps the weights linear in the gradients: Adam's first steps
follow the gradients' signs and would hide a reweighting. One launch per world size runs every
case in sequence.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hp_deepspeed.testing.ranks import run_ranks

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
MICRO_BATCH = 3
STEPS = 3
LR = 0.5
CASES = [(stage, accumulation) for stage in (0, 2, 3) for accumulation in (1, 2)]
# Rank 0's rows keep this many target tokens; rank 1's keep up to random_batch's 6.
SHORT_TARGET = 1


def global_micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    """The global micro-batch ``micro`` of ``step``: rank r's rows are r*MICRO_BATCH onwards."""
    from tests.conditioning.common import random_batch

    batch = random_batch(WORLD_SIZE * MICRO_BATCH, seed=1000 * step + micro, max_tgt=6)
    labels = batch["labels"]
    labels[:MICRO_BATCH, SHORT_TARGET:] = -100  # rank 0: short targets, few tokens
    labels[MICRO_BATCH:] = torch.where(labels[MICRO_BATCH:] == -100, 7, labels[MICRO_BATCH:])  # rank 1: full
    return batch


def rank_rows(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    if world_size == 1:
        return batch
    return {k: v[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH] for k, v in batch.items()}


def train_cases() -> dict:
    """In every rank: each (stage, accumulation) case trained STEPS steps by Trainer.train_step."""
    import deepspeed
    import torch.distributed as dist

    from hp_deepspeed.model.t5_config import T5Config
    from hp_deepspeed.training.flops import shape_of
    from hp_deepspeed.training.parallelism import mark_leaf_blocks
    from hp_deepspeed.training.trainer import Trainer, WindowStats
    from tests.conditioning.common import NUM_TASKS, tiny_model

    rank, world_size = dist.get_rank(), dist.get_world_size()
    out: dict = {}
    for stage, accumulation in CASES:
        model = tiny_model("hyperprompt_global", preset="tiny-v1_1", seed=0).train()
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO_BATCH * (WORLD_SIZE // world_size),
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": MICRO_BATCH * WORLD_SIZE * accumulation,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**6,
            "zero_allow_untested_optimizer": True,  # torch's SGD: see the module docstring
        }
        mark_leaf_blocks(model, ds_config)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                          optimizer=torch.optim.SGD(params, lr=LR))
        trainer = SimpleNamespace(
            engine=engine, model=model, world_size=world_size, device=torch.device("cpu"),
            model_shape=shape_of(T5Config.from_pretrained("tiny-v1_1")),
            cfg=SimpleNamespace(training=SimpleNamespace(gradient_accumulation=accumulation),
                                conditioning=SimpleNamespace(input_prompt_length=0)),
        )
        batches = iter([rank_rows(global_micro_batch(step, micro), rank, world_size)
                        for step in range(STEPS) for micro in range(accumulation)])
        window = WindowStats(NUM_TASKS)
        tokens = []
        for _ in range(STEPS):
            Trainer.train_step(trainer, batches, window)
            tokens.append(int(window.sums[NUM_TASKS:2 * NUM_TASKS].sum()))
            window.reset()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        out[(stage, accumulation)] = {"weights": weights, "tokens": tokens}
        engine.destroy()
    return out


@pytest.fixture(scope="module")
def runs():
    two = run_ranks(f"{__name__}:train_cases", world_size=WORLD_SIZE, timeout=300)
    (one,) = run_ranks(f"{__name__}:train_cases", world_size=1, timeout=300)
    return two, one


@pytest.mark.parametrize("stage,accumulation", CASES, ids=[f"zero{s}-accumulation{a}" for s, a in CASES])
def test_two_ranks_with_different_token_counts_train_like_one_rank_on_the_whole_batch(runs, stage, accumulation):
    two, one = runs
    case = (stage, accumulation)
    rank0, rank1, reference = two[0][case], two[1][case], one[case]
    # The premise: the ranks' halves hold very different numbers of target tokens.
    assert all(3 * a <= b for a, b in zip(rank0["tokens"], rank1["tokens"])), (rank0["tokens"], rank1["tokens"])
    # The comparison only means something if training moved the weights by far more than the
    # tolerance; a reweighted token moves them by a sizeable fraction of an update.
    initial = tiny_initial_weights()
    moved = max((w - initial[n]).abs().max().item() for n, w in reference["weights"].items())
    assert moved > 1e-2, moved
    for name, expected in reference["weights"].items():
        for got in (rank0["weights"][name], rank1["weights"][name]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def tiny_initial_weights() -> dict[str, torch.Tensor]:
    from tests.conditioning.common import tiny_model

    model = tiny_model("hyperprompt_global", preset="tiny-v1_1", seed=0)
    return {n: p.detach().clone() for n, p in model.named_parameters()}
