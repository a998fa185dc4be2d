"""What the ZeRO-3 equivalence test trains, shared by the launcher script and the plain reference.

Both sides build the same tiny model from the same seed, see the same global batches (each of
the 2 ranks gets half; the halves hold different numbers of distinct tasks and different padded
lengths, which is exactly what ZeRO-3's collective parameter gathers must survive) and step
AdamW with the same hyperparameters.
"""

from __future__ import annotations

import torch

from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.conditioning import ConditioningConfig

from .common import TINY_COND, pack, random_batch

WORLD_SIZE = 2
MICRO_BATCH = 4
STEPS = 3
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# (name, variant, activation checkpointing, freeze_backbone, compiled blocks, leaf blocks).
# Leaf blocks (training.zero3_leaf_blocks, the trainer's default) unless the name says
# "per-module": DeepSpeed's own hooks on every submodule.
CASES = [
    (f"{variant}-{ckpt}{'-frozen' if frozen else ''}{'-compiled' if compiled else ''}{'' if leaf else '-per-module'}",
     variant, ckpt, frozen, compiled, leaf)
    for variant, ckpt, frozen, compiled, leaf in [
        ("hyperprompt_global", "none", False, False, True),
        ("hyperprompt_global", "reentrant", False, False, True),
        ("hyperprompt_global", "non_reentrant", False, False, True),
        ("hyperprompt_global", "non_reentrant", True, False, True),
        ("hyperprompt_global", "none", False, False, False),
        ("hyperprompt_global", "non_reentrant", False, False, False),
        # model.compile: torch.compile'd blocks, inside which ZeRO-3 gathers each block's
        # parameters (aot_eager: dynamo's graph and autograd without generated kernels).
        ("hyperprompt_global", "non_reentrant", False, True, True),
        ("hyperformer", "none", False, False, True),
        ("hyperformer", "reentrant", False, False, True),
        ("hyperformer", "non_reentrant", False, False, True),
        ("adapter", "non_reentrant", False, False, True),
        # The other conditioning variants: Sep indexes per-task generators with a different set
        # of tasks on each rank, the case ZeRO-3's gathers of never-used generators must survive.
        ("hyperprompt_share", "none", False, False, True),
        ("hyperprompt_sep", "none", False, False, True),
        ("hyperprompt_sep", "non_reentrant", False, False, True),
        ("kv_prompt", "reentrant", False, False, True),
        ("prompt_tuning", "none", False, False, True),
    ]
]

# Packed rows (data.packing): each rank's half packed into rows with segment ids and per-segment
# prompts, against the same plain reference (unpacked): packing changes the layout, not the math.
# (name, variant, activation checkpointing), leaf blocks.
PACKED_CASES = [("hyperprompt_global-non_reentrant-packed", "hyperprompt_global", "non_reentrant"),
                ("kv_prompt-none-packed", "kv_prompt", "none")]

# Variants also built inside deepspeed.zero.Init, to check construction gives the same weights.
ZERO_INIT_VARIANTS = ["hyperprompt_global", "prompt_tuning", "hyperformer"]


def configs(variant: str, ckpt: str, frozen: bool, compiled: bool = False) -> tuple[ModelConfig, ConditioningConfig]:
    model_cfg = ModelConfig(name_or_path="tiny-v1_0", dropout_rate=0.0, seed=0, activation_checkpointing=ckpt,
                            compile=compiled, compile_backend="aot_eager")
    return model_cfg, ConditioningConfig(variant=variant, freeze_backbone=frozen, **TINY_COND)


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        # Partition every parameter (the default threshold would keep the tiny ones whole);
        # torch's linear, as training/parallelism.py resolves every stage-3 config.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "memory_efficient_linear": False},
        "optimizer": {"type": "AdamW", "params": {**ADAMW, "betas": list(ADAMW["betas"]), "torch_adam": True}},
        "steps_per_print": 1000,
    }


# Rank 0's half holds one task, rank 1's half three: different generator batch sizes per rank.
_STEP_TASKS = [[0, 0, 0, 0, 1, 2, 3, 1], [3, 1, 3, 1, 2, 2, 2, 2], [2, 0, 1, 3, 0, 0, 0, 0]]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    return random_batch(WORLD_SIZE * MICRO_BATCH, task_ids=_STEP_TASKS[step], seed=100 + step)


def rank_half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s micro-batch, trimmed to its own padded lengths."""
    half = {k: v[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH] for k, v in batch.items()}
    src = int(half["attention_mask"].sum(1).max())
    tgt = int((half["labels"] != -100).sum(1).max())
    half["input_ids"], half["attention_mask"] = half["input_ids"][:, :src], half["attention_mask"][:, :src]
    half["labels"] = half["labels"][:, :tgt]
    return half


def packed_half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s micro-batch as packed rows."""
    return pack(rank_half(batch, rank))[0]
