"""A toy model under a real DeepSpeed ZeRO-3 engine on gloo, plus the probes the tests compare.

The global batch is fixed at 4 samples per step: 2 micro-batches of 2 accumulated on 1 rank,
micro-batch 2 on each of 2 ranks, or micro-batch 1 on each of 4. Step ``s``'s global batch depends
only on ``s`` and each rank takes its contiguous slice, so runs on 1, 2 and 4 ranks see the same
data in every step. Dropout draws from the global torch
generator, so an exact 2-rank replay after resume also proves the RNG states were restored.
"""

from __future__ import annotations

import random

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

GLOBAL_BATCH = 4
MICRO_BATCH = 2
MODEL_CONFIG = {"hidden": 16, "inputs": 8}


class Toy(torch.nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.out(self.drop(torch.relu(self.inp(x)))), y)


def seed(base: int) -> None:
    """Seed every generator of this rank (differently per rank, as a trainer does)."""
    value = base + 1000 * dist.get_rank()
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def make_engine(hidden: int = 16, dropout: float = 0.1, init_seed: int = 0, bf16: bool = False, stage: int = 3):
    """A fresh ZeRO engine (stage 3 unless told); ``init_seed`` changes the initial weights (a
    resume must overwrite them)."""
    world = dist.get_world_size()
    micro_batch = min(MICRO_BATCH, GLOBAL_BATCH // world)
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = Toy(hidden, dropout)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": GLOBAL_BATCH // (micro_batch * world),
        # torch_adam: the PyTorch AdamW, so no DeepSpeed CPU-Adam extension has to be compiled.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 20}},
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": bf16},
    }
    # Two param groups with different weight decay, as a real trainer has (none on biases).
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
    ]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    assert engine.zero_optimization_stage() == stage
    return engine


def batch(step: int, first: int, size: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``first .. first + size - 1`` of step ``step``'s global batch."""
    generator = torch.Generator().manual_seed(10_000 * step)
    x, y = torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 1, generator=generator)
    return x[first:first + size].to(dtype), y[first:first + size].to(dtype)


def train_step(engine, step: int) -> float:
    """One optimizer step over the global batch; returns the global mean loss (same on all ranks)."""
    accumulation = engine.gradient_accumulation_steps()
    size = engine.train_micro_batch_size_per_gpu()
    total = torch.zeros(1)
    for micro in range(accumulation):
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        loss = engine(*batch(step, (dist.get_rank() * accumulation + micro) * size, size, dtype))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    dist.all_reduce(total)
    return total.item() / (accumulation * dist.get_world_size())


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Full (gathered) fp32 weights and Adam moments, plus the lr; collective under ZeRO-3."""
    out = {}
    for name, param in engine.module.named_parameters():
        out[f"{name}.fp32"] = safe_get_full_fp32_param(param).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().clone()
    out["lr"] = torch.tensor(engine.get_lr())
    groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    out["weight_decay"] = torch.tensor([group["weight_decay"] for group in groups])
    out["global_steps"] = torch.tensor(engine.global_steps)
    return out


def rng_fingerprint() -> dict[str, object]:
    """Comparable form of this rank's generator states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "torch": torch.get_rng_state(),
    }
