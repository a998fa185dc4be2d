"""Crash-safe, resumable, rank-count-portable checkpoints of a DeepSpeed ZeRO run.

``CheckpointManager`` is the trainer's interface; ``convert_to_universal`` is the one-shot
conversion behind ``hp-deepspeed convert-universal``; ``layout`` documents the folder structure,
``integrity`` how every file is written (fsynced, checksummed) and verified before a resume.
"""

from hp_deepspeed.checkpointing.config import CheckpointConfig
from hp_deepspeed.checkpointing.layout import CheckpointError, find_latest
from hp_deepspeed.checkpointing.manager import CheckpointManager
from hp_deepspeed.checkpointing.universal import convert_to_universal

__all__ = ["CheckpointConfig", "CheckpointError", "CheckpointManager", "convert_to_universal", "find_latest"]
