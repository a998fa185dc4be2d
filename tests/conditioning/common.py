"""Tiny models and batches shared by the conditioning tests."""

from __future__ import annotations

import numpy as np
import torch

from hp_deepspeed.data.stream import PackedLayout, pack_rows, packed_batch
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.conditioning import ConditioningConfig
from hp_deepspeed.model.hyperprompt_t5 import HyperPromptT5, build_model

NUM_TASKS = 4
# Small but with every dimension distinct, so a transposed or mis-split tensor cannot pass.
TINY_COND = dict(prompt_length=3, bottleneck=5, task_embedding_dim=6, layer_embedding_dim=7,
                 projector_hidden_dim=9, hyper_embedding_dim=4)
BLOCK_VARIANTS = ["kv_prompt", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global", "hyperformer", "adapter"]
CONDITIONED_VARIANTS = ["prompt_tuning"] + BLOCK_VARIANTS


def tiny_model(variant: str, preset: str = "tiny-v1_1", activation_checkpointing: str = "none",
               seed: int = 0, **cond) -> HyperPromptT5:
    """A dropout-free tiny HyperPromptT5 (tiny presets: d_model 32, 4 heads, 2 + 3 blocks)."""
    model_cfg = ModelConfig(name_or_path=preset, dropout_rate=0.0, seed=seed,
                            activation_checkpointing=activation_checkpointing)
    cond_cfg = ConditioningConfig(variant=variant, **{**TINY_COND, **cond})
    return build_model(model_cfg, cond_cfg, num_tasks=NUM_TASKS)


def random_batch(batch: int, task_ids: list[int] | None = None, seed: int = 0, vocab: int = 96,
                 max_src: int = 9, max_tgt: int = 6) -> dict[str, torch.Tensor]:
    """Right-padded examples of varied lengths (pad 0, labels -100 past the end)."""
    gen = torch.Generator().manual_seed(seed)
    src_len = torch.randint(3, max_src + 1, (batch,), generator=gen)
    tgt_len = torch.randint(2, max_tgt + 1, (batch,), generator=gen)
    input_ids = torch.randint(2, vocab, (batch, max_src), generator=gen)
    labels = torch.randint(2, vocab, (batch, max_tgt), generator=gen)
    attention_mask = (torch.arange(max_src) < src_len[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = labels.masked_fill(torch.arange(max_tgt) >= tgt_len[:, None], -100)
    if task_ids is None:
        task_ids = torch.randint(0, NUM_TASKS, (batch,), generator=gen).tolist()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_ids": torch.tensor(task_ids)}


def example(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Example ``i`` alone, without its padding."""
    src = int(batch["attention_mask"][i].sum())
    tgt = int((batch["labels"][i] != -100).sum())
    return {"input_ids": batch["input_ids"][i:i + 1, :src], "attention_mask": batch["attention_mask"][i:i + 1, :src],
            "labels": batch["labels"][i:i + 1, :tgt], "task_ids": batch["task_ids"][i:i + 1]}


# Packed rows of at most this many input / target tokens: random_batch's examples (3..9 input and
# 2..6 target tokens) then share rows two or three at a time.
PACK_MAX_INPUT, PACK_MAX_TARGET = 16, 9
# The batch entries of packed rows the model takes.
PACKED_KEYS = ("input_ids", "attention_mask", "labels", "input_segment_ids", "target_segment_ids", "segment_task_ids")


def pack(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], PackedLayout, np.ndarray]:
    """The same examples as packed rows (data/stream.py's ``packed_batch``), where each example
    went, and each example's target length."""
    in_len = batch["attention_mask"].sum(1).numpy()
    tgt_len = (batch["labels"] != -100).sum(1).numpy()
    real_in = batch["attention_mask"].numpy().astype(bool)
    real_tgt = batch["labels"].numpy() != -100

    def flat(ids, real, lengths):
        return ids[real], np.cumsum(lengths) - lengths, lengths

    packed = packed_batch(flat(batch["input_ids"].numpy(), real_in, in_len),
                          flat(batch["labels"].numpy(), real_tgt, tgt_len),
                          batch["task_ids"].numpy(), 0, PACK_MAX_INPUT, PACK_MAX_TARGET)
    packed = {k: packed[k] for k in PACKED_KEYS}
    return packed, pack_rows(in_len, tgt_len, PACK_MAX_INPUT, PACK_MAX_TARGET), tgt_len
