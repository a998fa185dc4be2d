"""Evaluation sets: every eval split of every task, sharded so all ranks stay in lockstep.

Under ZeRO-3 every forward is collective (parameters are gathered layer by layer), so every
rank must run the same number of evaluation batches. ``build_eval_batches`` sorts a split's
examples by length (longest first, so a too-large batch fails at once), pads the list with
dummy examples up to a multiple of ``micro_batch_size * world_size``, cuts it into global
batches and gives rank ``r`` the examples ``r, r+W, ...`` of each. Dummy examples have
``example_index == -1``; ``EvalSet.compute_metrics`` only takes real indices, so they never
reach a metric.

Typical use in the trainer::

    for eval_set in build_eval_batches(cfg, tasks, tokenizer, micro_batch_size, rank, world):
        outputs = {}
        for batch in eval_set.batches:
            texts = generate(batch)                                   # one string per row
            outputs.update((int(i), t) for i, t in zip(batch["example_index"], texts) if i >= 0)
        outputs = merge all ranks' dicts (all_gather_object)
        scores[eval_set.name] = eval_set.compute_metrics(outputs)

Not here: scoring a model on these batches (rank classification, decoding, averages), which is
``training/evaluation.py``'s ``Evaluator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hp_deepspeed.data.config import DataConfig
from hp_deepspeed.data.stream import collate
from hp_deepspeed.data.tasks import Task
from hp_deepspeed.data.tokenization import TokenizedSplit, load_split


@dataclass
class EvalSet:
    """One eval split of one task, with this rank's share of the batches."""

    name: str
    """Reporting name, ``Task.eval_set_name(split)`` (e.g. ``glue/mnli_matched``)."""
    task: Task
    split: str
    references: list[dict[str, Any]] = field(repr=False)
    """Per example index: the raw reference the metric needs (label, answers, group, pair)."""
    target_texts: list[str] = field(repr=False)
    """Per example index: the target string (the first answer for ReCoRD)."""
    batches: list[dict[str, torch.Tensor]] = field(repr=False)
    """This rank's batches: the ``TrainStream`` keys plus ``example_index`` [B] (-1: dummy).
    Every rank has the same number of batches of the same size."""

    def __len__(self) -> int:
        return len(self.references)

    def compute_metrics(self, outputs: Mapping[int, str] | Sequence[str]) -> dict[str, float]:
        """Metrics from generated texts for every example (index -> text, or a list in index
        order): each text goes through ``Task.postprocess`` then ``Task.metrics``."""
        if isinstance(outputs, Mapping):
            missing = [i for i in range(len(self)) if i not in outputs]
            if missing or len(outputs) != len(self):
                raise ValueError(
                    f"{self.name}: outputs for {len(outputs)} examples, expected indices 0..{len(self) - 1} "
                    f"(first missing: {missing[:5]})"
                )
            texts = [outputs[i] for i in range(len(self))]
        else:
            texts = list(outputs)
            if len(texts) != len(self):
                raise ValueError(f"{self.name}: {len(texts)} outputs for {len(self)} examples")
        predictions = [self.task.postprocess(t) for t in texts]
        return self.task.metrics(predictions, self.references)


def shard_eval_split(
    split: TokenizedSplit, task_id: int, pad_id: int, micro_batch_size: int, rank: int, world_size: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's padded, length-sorted batches of ``split`` (see the module docstring)."""
    order = np.lexsort((np.arange(len(split)), -split.target_lengths, -split.input_lengths))
    global_batch = micro_batch_size * world_size
    padded = -(-len(order) // global_batch) * global_batch
    # Dummies repeat the shortest example: real tensors of harmless size, flagged by index -1.
    indices = np.concatenate([order, np.full(padded - len(order), -1, dtype=np.int64)])
    shortest = int(order[-1])
    batches = []
    for start in range(0, padded, global_batch):
        share = indices[start : start + global_batch][rank::world_size]
        items = [(0, int(i) if i >= 0 else shortest) for i in share]
        batch = collate([split], items, [task_id], pad_id)
        batch["example_index"] = torch.from_numpy(share.astype(np.int64))
        batches.append(batch)
    return batches


def build_eval_batches(
    cfg: DataConfig,
    tasks: Sequence[Task],
    tokenizer,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[EvalSet]:
    """An ``EvalSet`` per (task, eval split), in task order, holding this rank's batches."""
    if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sharding: micro_batch_size={micro_batch_size} rank={rank} world_size={world_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sets = []
    for task in tasks:
        for split_name in task.eval_splits:
            split = load_split(task, split_name, cfg, tokenizer, training=False)
            sets.append(
                EvalSet(
                    name=task.eval_set_name(split_name),
                    task=task,
                    split=split_name,
                    references=split.references,
                    target_texts=split.target_texts,
                    batches=shard_eval_split(split, task.task_id, pad_id, micro_batch_size, rank, world_size),
                )
            )
    return sets
