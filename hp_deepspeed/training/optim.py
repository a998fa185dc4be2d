"""Optimizer settings and learning-rate schedules.

The schedule is a plain ``LambdaLR`` handed to ``deepspeed.initialize``, so DeepSpeed saves and
restores it with every checkpoint; the optimizer itself is described in the DeepSpeed config
(``ds_config.build_ds_config``) so DeepSpeed can pick its fused or CPU-offload implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (T5 fine-tuning with AdamW: 1e-4 to 3e-4; Adafactor-era runs used 1e-3)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW). T5 fine-tuning conventionally uses none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "linear"
    """Shape after warmup: constant, linear or cosine decay to ``min_lr_ratio * lr`` at the last
    step, or T5's inverse square root (``lr * sqrt(warmup / step)``)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    min_lr_ratio: float = 0.0
    """Floor of the linear and cosine decays, as a fraction of ``lr``."""
    clip_grad_norm: float = 1.0
    """Global gradient-norm clipping (DeepSpeed's ``gradient_clipping``); 0 disables it."""
    implementation: Literal["auto", "torch", "deepspeed"] = "auto"
    """Which AdamW runs the update. ``auto``: torch's AdamW (fused CUDA kernel on GPUs), or
    DeepSpeedCPUAdam when the DeepSpeed config offloads the optimizer; nothing is compiled.
    ``torch``: torch's AdamW always. ``deepspeed``: DeepSpeed's FusedAdam on GPUs (JIT-built with
    nvcc on first use; needs a CUDA toolkit of torch's CUDA major) or DeepSpeedCPUAdam with
    offload."""

    def __post_init__(self) -> None:
        # A non-finite or out-of-range value here trains to NaN weights (lr=inf) or divides by
        # zero inside Adam (eps=0); refused before anything starts, naming the key.
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers [beta1, beta2], got {list(self.betas)}")
        checks = [
            ("lr", self.lr, self.lr > 0, "positive"),
            ("betas[0]", self.betas[0], 0.0 <= self.betas[0] < 1.0, "in [0, 1)"),
            ("betas[1]", self.betas[1], 0.0 <= self.betas[1] < 1.0, "in [0, 1)"),
            ("eps", self.eps, self.eps > 0, "positive"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("clip_grad_norm", self.clip_grad_norm, self.clip_grad_norm >= 0, ">= 0 (0 disables clipping)"),
            ("min_lr_ratio", self.min_lr_ratio, 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]"),
        ]
        for key, value, in_range, expected in checks:
            if not math.isfinite(value):
                raise ValueError(f"optim.{key} must be a finite number, got {value}")
            if not in_range:
                raise ValueError(f"optim.{key} must be {expected}, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def lr_multiplier(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(max(cfg.warmup_steps, 1) / max(step + 1, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(cfg, step, total_steps))
