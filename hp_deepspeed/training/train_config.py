"""The trainer's own settings, and ``JobConfig``, which composes every component's config.

A job is described by YAML files plus dotted overrides (``hp_deepspeed.config.load_config``);
each section below belongs to the component that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hp_deepspeed.checkpointing import CheckpointConfig
from hp_deepspeed.data import DataConfig
from hp_deepspeed.model.conditioning import PER_EXAMPLE_VARIANTS, ConditioningConfig
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.training.optim import OptimConfig
from hp_deepspeed.training.preemption import PreemptionConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: metrics, the resolved config, checkpoints/ and exports live here. Must be on
    a filesystem every node sees (checkpoints are written by all ranks)."""
    seed: int = 0
    """Seeds model initialisation, dropout and the data stream."""

    def __post_init__(self) -> None:
        if not self.dir.strip():
            raise ValueError("run.dir must be a folder path, got an empty string")


@dataclass
class TrainingConfig:
    steps: int = 1000
    """Optimizer steps to train for (the run ends at this step, resumed or not)."""
    micro_batch_size: int = 8
    """Examples per rank per forward pass."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step; the global batch is micro x accumulation x ranks."""
    ds_config: str = "ds_configs/auto_bf16.json"
    """DeepSpeed config file (sharding, offload, precision only; see ds_configs/). The default
    leaves the ZeRO stage and sizes to ``training/parallelism.py`` (ZeRO-3 only when needed)."""
    zero3_leaf_blocks: bool = True
    """Under ZeRO-3, gather each T5 block as one unit with one pair of hooks (DeepSpeed "leaf
    modules") instead of hooking every linear layer; false restores DeepSpeed's per-module
    hooks. See ``training/parallelism.py`` for why and what it costs."""
    log_every: int = 10
    """Optimizer steps between metric records (loss per task, throughput, memory)."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0 (off in batch jobs' logs if you prefer plain lines)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under RUN_DIR/tensorboard."""
    max_nonfinite_steps: int = 3
    """Optimizer steps in a row with a non-finite loss or gradient norm (or an update DeepSpeed
    skipped for it) after which training stops, exit code 65, without saving; the last finite
    checkpoint stays ``latest``. No checkpoint is written while the latest step is non-finite."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "gradient_accumulation", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    every: int = 0
    """Optimizer steps between evaluations; 0 evaluates only at the end of training."""
    split: str = "validation"
    """Split to evaluate (each task maps it to its own split name, e.g. MNLI's matched set)."""
    max_examples_per_task: int = 0
    """Cap on evaluation examples per task (0 = all); a cheap proxy for frequent evaluation."""
    batch_size: int = 16
    """Examples per rank per evaluation forward pass."""
    max_new_tokens: int = 16
    """Greedy decoding length for generative tasks."""

    def __post_init__(self) -> None:
        for name in ("every", "max_examples_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)

    def __post_init__(self) -> None:
        # The paper's multi-task baseline is the plain backbone told the task in the input text:
        # the one switch ``conditioning.variant: mtl`` sets both halves.
        if self.conditioning.variant == "mtl":
            self.data.task_prefix = True
        if self.data.packing is True and self.conditioning.variant in PER_EXAMPLE_VARIANTS:
            raise ValueError(
                f"data.packing: true does not work with conditioning.variant: {self.conditioning.variant}, which "
                f"conditions whole rows, not segments; use packing: false or auto, or one of none, mtl, kv_prompt, hyperprompt_*")
