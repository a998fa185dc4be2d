"""Every split a job will read, read once before any rank starts.

``check_splits(cfg, tasks, tokenizer, training=True)`` is what ``hp-deepspeed validate`` (and so
the launch scripts' preflight) runs: for each task, its training split (``training``) and each
evaluation split, it finds the file, decodes and parses every row, runs the task's preprocessor
on each (so a field the ``input_template`` names but a row lacks, or a label outside
``label_words``, is found here), counts the examples and tokenises them into the same cache the
ranks read (``tokenization.load_split``), so the work is not done twice. The first problem is
raised as a ``DataError`` naming the task, the file and line, and the config field to change.

What it does not do: download hub datasets (a split that only the hub has is checked to be
reachable, not read), or check what only the ranks know (their share of the data).
"""

from __future__ import annotations

from hp_deepspeed.data.config import DataConfig
from hp_deepspeed.data.sources import locate
from hp_deepspeed.data.tasks import Task
from hp_deepspeed.data.tokenization import load_split


def splits_read(tasks: list[Task], training: bool) -> list[tuple[Task, str, bool]]:
    """(task, split, as training data) for every split a train (or eval) job reads: the training
    splits, then every evaluation split (a training run always evaluates at its last step)."""
    out = [(t, t.train_split, True) for t in tasks if training and t.train_split is not None]
    return out + [(t, split, False) for t in tasks for split in t.eval_splits]


def check_splits(cfg: DataConfig, tasks: list[Task], tokenizer, training: bool) -> dict[str, int]:
    """Read every split the job reads; returns ``"task[split]" -> examples``. Raises ``DataError``."""
    counts = {}
    for task, split, as_training in splits_read(tasks, training):
        path, _ = locate(task, split)
        if path is None:  # the hub's: reachable, not downloaded here
            continue
        counts[f"{task.name}[{split}]"] = len(load_split(task, split, cfg, tokenizer, training=as_training))
    return counts
