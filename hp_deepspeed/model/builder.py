"""The trainer's model section: which T5, in what dtype, how it is checkpointed, and building it.

``build_backbone`` builds the T5 backbone alone; ``hyperprompt_t5.build_model`` builds the
model the trainer trains (this backbone plus its task conditioning) and calls it.

:func:`construction_site` is the one rule of where new parameters come to exist, for the
backbone and the conditioning alike: on the meta device (to count parameters), inside
``deepspeed.zero.Init`` so that each rank only ever allocates its partition (ZeRO stage 3), or
plainly on the CPU. ``build_backbone`` then decides whether weights are loaded from a Hugging
Face checkpoint (streamed tensor by tensor under ZeRO-3) or left at their random initialisation.

Not here: the conditioning modules (``conditioning.py``), the weights' file format
(``hf_checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Literal

import torch

from hp_deepspeed.compat.deepspeed import zero_init
from hp_deepspeed.model.hf_checkpoint import CheckpointReader, load_hf_weights
from hp_deepspeed.model.t5 import ActivationCheckpointing, T5Model
from hp_deepspeed.model.t5_config import PRESET_ALIASES, PRESETS, T5Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Presets without published weights: always randomly initialised.
_RANDOM_ONLY = {name for name in PRESETS if name.startswith("tiny-")}


@dataclass
class ModelConfig:
    """The ``model:`` section of a run config."""

    name_or_path: str = "t5-small"
    """A preset name (``t5-base``, ``google/flan-t5-xl``, ``tiny-v1_1`` ...), a local folder
    with config.json (+ weights), or a hub id."""
    load_weights: bool = True
    """Load the checkpoint's weights; false starts from a random initialisation (tiny presets
    have no weights and always start random)."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """Per-block activation checkpointing: ``none``, ``reentrant`` (torch's
    ``use_reentrant=True``) or ``non_reentrant``. Trades one extra block forward for activations."""
    dropout_rate: float | None = None
    """Overrides the checkpoint's dropout everywhere (T5 fine-tuning usually uses 0.1); None keeps it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the parameters are created in without ZeRO-3 (and on the meta device). Under ZeRO-3
    ``zero.Init`` takes it from the DeepSpeed config's bf16/fp16 section instead."""
    seed: int = 0
    """Seed of the random initialisation (only matters when weights are not loaded)."""
    compile: bool = False
    """``torch.compile`` each T5 block for training and scoring (decoding stays eager). Costs a
    compile of one encoder and one decoder block at the first step and a recompile with dynamic
    lengths when the lengths first change; parameter names and checkpoints are unchanged. Off
    by default: the GPU speed-up is not measured yet (docs/benchmarks.md, section 7)."""
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager", "eager"] = "inductor"
    """The ``torch.compile`` backend: ``inductor`` (generated kernels); the others trace without
    generating kernels (``aot_eager`` is what the CPU tests use to check the graphs quickly)."""


def resolve_t5_config(config: ModelConfig) -> T5Config:
    """The architecture of ``config.name_or_path`` with the dropout override applied."""
    t5_config = T5Config.from_pretrained(config.name_or_path)
    if config.dropout_rate is not None:
        t5_config = dataclasses.replace(t5_config, dropout_rate=config.dropout_rate)
    return t5_config


def check_model_source(config: ModelConfig) -> None:
    """The cheap part of ``build_backbone``, for a preflight: a preset or a local folder must give a
    T5 config, and a local folder whose weights are to be loaded must hold weight files. A hub id
    is left to the ranks (a preflight downloads nothing)."""
    name = config.name_or_path
    local = Path(name).exists() or name.startswith((".", "/"))
    if local or name in PRESETS or name in PRESET_ALIASES:
        resolve_t5_config(config)
    if local and config.load_weights:
        CheckpointReader(name)  # reads index files and safetensors headers only


def construction_site(ds_config: dict[str, Any] | str | None, device: torch.device | str) -> ContextManager:
    """Where modules created inside this context put their parameters: the meta device for
    ``device="meta"``; ``deepspeed.zero.Init`` for a ZeRO stage-3 ``ds_config`` (every rank must
    enter it; the dtype comes from the config's precision section, see
    ``compat.deepspeed.zero_init``); otherwise plainly, for the caller to move to ``device``."""
    if str(device) == "meta":
        return torch.device("meta")
    if zero_stage(ds_config) == 3:
        return zero_init(ds_config)
    return contextlib.nullcontext()


def build_backbone(
    config: ModelConfig,
    ds_config: dict[str, Any] | str | None = None,
    device: torch.device | str = "cpu",
) -> T5Model:
    """Build (and load) the backbone.

    ``ds_config`` with ZeRO stage 3: built inside ``deepspeed.zero.Init`` and loaded by
    streaming; every rank must call this. ``device="meta"``: shapes only, nothing is loaded.
    """
    t5_config = resolve_t5_config(config)
    dtype = DTYPES[config.dtype]
    zero3 = zero_stage(ds_config) == 3
    torch.manual_seed(config.seed)
    with construction_site(ds_config, device):
        model = T5Model(t5_config, config.activation_checkpointing)
    if str(device) == "meta":
        return model.to(dtype)
    if not zero3:
        model = model.to(device=device, dtype=dtype)
    if config.load_weights and config.name_or_path not in _RANDOM_ONLY:
        load_hf_weights(model, config.name_or_path, zero3=zero3)
    if config.compile:
        model.compile_blocks(config.compile_backend)
    return model


def zero_stage(ds_config: dict[str, Any] | str | None) -> int:
    if ds_config is None:
        return 0
    if isinstance(ds_config, str):
        ds_config = json.loads(Path(ds_config).read_text())
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
