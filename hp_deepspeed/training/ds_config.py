"""Assemble the DeepSpeed config from a ``ds_configs/*.json`` file and the trainer's own config.

The JSON files in ``ds_configs/`` describe only *how* to shard and store (ZeRO stage, offload,
precision). Everything the trainer also knows -- batch sizes, gradient accumulation, clipping,
the optimizer -- is written in here from the trainer config, and a JSON file that sets one of
those keys is rejected, so the two can never disagree.

With bf16 the gradients are accumulated in fp32 (``data_types.grad_accum_dtype``, which
DeepSpeed 0.19.8 reads in ``runtime/config.py`` and hands to every ZeRO stage): each
micro-batch's gradient is pre-scaled by 1/global-tokens, and summing such small terms with
bf16's 8-bit mantissa loses most of them. A file may still set ``data_types`` itself.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from hp_deepspeed.compat.deepspeed import zero_stage_for_bf16_fp32_accumulation
from hp_deepspeed.config import ConfigError
from hp_deepspeed.training.optim import OptimConfig
from hp_deepspeed.training.parallelism import Hardware, ModelSize, resolve_zero

# Keys owned by the trainer config; a ds_configs file must not set them.
TRAINER_OWNED_KEYS = {
    "train_batch_size": "training.micro_batch_size x gradient_accumulation x ranks",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation",
    "gradient_clipping": "optim.clip_grad_norm",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule",
    "steps_per_print": "training.log_every",
}

FP16_REFUSAL = (
    "fp16 is refused for T5: T5's activations overflow the fp16 range (it was pre-trained in "
    "bfloat16, whose exponent range matches fp32), which gives inf/NaN losses. Use "
    '"bf16": {"enabled": true} on Ampere or newer GPUs, or fp32.'
)

_ENV_REF = re.compile(r"\$\{(\w+)\}")


def _expand_env(value: Any, where: str) -> Any:
    """Expand ``${VAR}`` in strings (e.g. the NVMe path), erroring on unset variables."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set (used as {value!r})")
            return os.environ[name]
        return _ENV_REF.sub(sub, value)
    return value


def read_ds_config(path: str | Path) -> dict:
    """Load a ``ds_configs`` JSON file and check it against the trainer's ownership rules."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training.ds_config: file {path} does not exist (see ds_configs/)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"training.ds_config: {path} is not valid JSON: {err}") from None
    for key, owner in TRAINER_OWNED_KEYS.items():
        if key in cfg:
            raise ConfigError(f"{path}: key {key!r} is set by the trainer from {owner}; remove it from the file")
    if cfg.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{path}: {FP16_REFUSAL}")
    return _expand_env(cfg, str(path))


def build_ds_config(
    base: dict,
    *,
    micro_batch_size: int,
    gradient_accumulation: int,
    world_size: int,
    optim: OptimConfig,
    d_model: int,
    log_every: int,
    on_cpu: bool,
    model_size: ModelSize | None = None,
) -> dict:
    """The complete DeepSpeed config for one run (a new dict; ``base`` is not modified).

    ``"auto"`` values of the ZeRO section (the stage, bucket and persistence sizes) are chosen by
    ``training/parallelism.py`` from ``model_size`` and the GPUs; explicit values are kept.
    """
    cfg = json.loads(json.dumps(base))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = gradient_accumulation
    cfg["train_batch_size"] = micro_batch_size * gradient_accumulation * world_size
    if optim.clip_grad_norm > 0:
        cfg["gradient_clipping"] = optim.clip_grad_norm
    cfg["steps_per_print"] = max(log_every, 1) * 1000  # the trainer logs; keep DeepSpeed quiet
    zero = cfg.setdefault("zero_optimization", {})
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    cfg["optimizer"] = {"type": "AdamW", "params": optimizer_params(optim, on_cpu, offload_optimizer)}
    resolve_zero(zero, d_model=d_model, hw=Hardware.detect(world_size, on_cpu), model_size=model_size)
    if cfg.get("bf16", {}).get("enabled", False):
        _accumulate_in_fp32(cfg, zero)
    return cfg


def _accumulate_in_fp32(cfg: dict, zero: dict) -> None:
    """bf16 weights, fp32 gradient accumulation (``data_types.grad_accum_dtype``), unless the file
    chose otherwise; at the ZeRO stage DeepSpeed can run that mix at
    (``compat.deepspeed.zero_stage_for_bf16_fp32_accumulation``)."""
    accum = cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    stage = zero.get("stage", 0)
    if accum == "fp32" and zero_stage_for_bf16_fp32_accumulation(stage) != stage:
        zero["stage"] = zero_stage_for_bf16_fp32_accumulation(stage)


def optimizer_params(optim: OptimConfig, on_cpu: bool, offload_optimizer: bool) -> dict[str, Any]:
    """DeepSpeed's ``optimizer.params``; the keys ``torch_adam``/``fused`` choose the implementation.

    DeepSpeed 0.19.8 (``engine.get_optimizer_configuration``) builds ``torch.optim.AdamW`` from
    the remaining params when ``torch_adam`` is set, DeepSpeedCPUAdam when the optimizer is
    offloaded, and its own FusedAdam otherwise. FusedAdam is JIT-compiled at the first run: it
    needs an nvcc matching torch's CUDA major and breaks on TORCH_CUDA_ARCH_LIST=9.0a, so by
    default (``auto``) the GPU uses torch's fused AdamW kernel instead, which ships with torch.
    """
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    choice = optim.implementation
    if choice == "torch" or (choice == "auto" and not offload_optimizer) or (on_cpu and not offload_optimizer):
        # The CPU has no FusedAdam either; DeepSpeedCPUAdam is only needed for offload.
        params["torch_adam"] = True
        if not on_cpu and not offload_optimizer:
            params["fused"] = True  # torch's one-kernel CUDA AdamW
    return params

