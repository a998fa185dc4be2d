"""``CheckpointConfig``: when to save, what to keep, what to resume from.

The trainer's job config holds one of these under ``checkpoint:``; ``hp_deepspeed.config``
validates keys and types, ``__post_init__`` validates values, so a bad retention policy fails
on the login node and not after the first hour of an 11B run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class CheckpointConfig:
    """Checkpointing and resume policy of one training run."""

    interval: int = 1000
    """Save every ``interval`` optimizer steps (the trainer also saves on preemption and at the end)."""

    keep_last: int = 3
    """Keep the newest ``keep_last`` complete checkpoints; older ones are deleted unless pinned as a best."""

    keep_best: bool = True
    """Pin the checkpoint holding the best evaluation score of each task (``best.json``) so retention never deletes it."""

    resume: str = "auto"
    """``"auto"``: newest complete checkpoint of this run, or a fresh start when there is none;
    ``"none"``: always start fresh (existing checkpoints are kept and may later be rotated out);
    anything else: path to one ``step-N`` folder, which must exist and be complete."""

    convert_universal: Literal["auto", "never"] = "auto"
    """Resuming on a different number of ranks needs a DeepSpeed universal checkpoint.
    ``"auto"``: convert on first use (rank 0 runs ``ds_to_universal`` into ``step-N/universal``, reused afterwards);
    ``"never"``: fail with an error that says to convert with ``hp-deepspeed convert-universal``."""

    conversion_timeout_s: float = 4 * 3600.0
    """How long ranks other than 0 wait for rank 0's universal conversion before giving up (an 11B
    conversion reads every optimizer shard; the wait polls the file system, not a collective, so the
    process-group timeout does not apply)."""

    accept_changed_data: bool = False
    """A training file that changed since the checkpoint (size or content) refuses the resume, since
    the saved data position would then point at other rows; ``true`` resumes anyway, with a warning."""

    async_save: Literal["auto", "always", "never"] = "never"
    """Where a save's files are written. ``"always"``: ``save`` copies the state into host memory
    (pinned buffers on a GPU, reused between saves), returns, and a background thread writes,
    fsyncs and commits the checkpoint while training continues; ``COMPLETE`` and ``latest`` still
    appear only once every rank's files are durable, and the last save of a run, a preemption
    save and every exit path wait for that. Costs one host copy of the rank's checkpoint shard.
    ``"never"``: training waits for the whole save. ``"auto"``: ``always`` when the job trains on
    GPUs, where the copy to host memory is a fraction of the disk write; ``never`` on CPU, where
    the copy competes with training for the same cores and memory. The default is ``never`` until
    the CUDA snapshot (pinned buffers, side stream, events) has run on a GPU: the GPU smoke check
    (bench/gpu_smoke.py) saves with ``always`` to verify it."""

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"checkpoint.interval must be >= 1, got {self.interval}")
        if self.keep_last < 1:
            # Keeping zero would delete the checkpoint that was just written.
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if not self.resume:
            raise ValueError('checkpoint.resume must be "auto", "none" or a path to a step-N folder')
        if self.async_save not in ("auto", "always", "never"):
            raise ValueError(f'checkpoint.async_save must be "auto", "always" or "never", got {self.async_save!r}')
        if self.conversion_timeout_s <= 0:
            raise ValueError(f"checkpoint.conversion_timeout_s must be > 0, got {self.conversion_timeout_s}")
