"""How the model is sharded: the ZeRO stage and its bucket, prefetch and persistence sizes.

The one place that fills what a ``ds_configs`` file leaves to the project (``"auto"``); a value
the file sets explicitly always wins. ``training/ds_config.py`` calls ``resolve_zero`` and
``bench/gpu.py`` reports ``choose_zero`` for the presets.

Why these rules (measured on one H200, docs/benchmarks.md section 7): ZeRO-3 pays per-submodule Python hooks and
parameter gathers on every forward and backward, which at world size 1 shard nothing; for
t5-large it was 4.5x slower than plain PyTorch. So:

* **stage**: 3 only when it must -- when the replicated model states of stage 0 (one GPU) or the
  partitioned optimizer of stage 2 (several) would take more than ``STATE_SHARE`` of a GPU's
  usable memory (the ``plan`` tool's budget) and ZeRO-3 makes them smaller (with one GPU it
  does not: there stage 0 stays, and a model too large needs offload, see ``hp-deepspeed plan``).
  The rest of the budget is left for activations, which depend on the micro-batch.
* **buckets**: Hugging Face's rule (reduce bucket d_model^2, prefetch 0.9 d_model^2) flushes
  about 700 reduce buckets per t5-large step and never prefetches (one FFN weight, 4.2M
  elements, is larger than its 0.94M prefetch bucket). Here a reduce bucket holds a quarter of
  the trainable gradients (a few flushes per step) and the prefetch bucket two T5 blocks, both
  capped at DeepSpeed's own 5e8 elements (1 GB in bf16).
* **persistence**: with one rank a ZeRO-3 "partition" is the whole parameter, so keeping every
  parameter gathered costs one extra copy and saves every gather; it is done when that copy
  takes at most ``PERSIST_SHARE`` of the budget. With several ranks DeepSpeed's default (1e5
  elements: norms, biases, position-bias tables, small hypernetwork weights) stays.
* **torch's linear**: ZeRO-3's ``memory_efficient_linear`` (DeepSpeed's default: true) makes
  ``zero.Init`` and ``deepspeed.initialize`` replace ``torch.nn.functional.linear`` for the whole
  process with a Python ``autograd.Function`` (``inspect.signature`` and autocast queries in
  every call, a Python backward). What it saves -- a bf16 copy of the weight kept for backward --
  exists only under autocast, which no project configuration uses (DeepSpeed's bf16 casts the
  weights themselves), and ``torch.compile`` traces the plain op. So at stage 3 the project sets
  it false unless the file says otherwise (host time of a t5-large-deep ZeRO-3 step -5 to -16%
  in the ``host`` stage).
* **leaf blocks** (``mark_leaf_blocks``): under ZeRO-3 each T5 block is gathered as one unit,
  with one pair of module hooks, instead of one pair per linear layer, norm and dropout (about
  15 modules a block). The hooks are host time: at t5-large's depth with negligible compute
  (the ``host`` stage of ``bench/gpu.py``) a ZeRO-3 step took 3.0x the host time of plain
  PyTorch, 1.9-2.2x with leaf blocks, 1.8-1.9x with torch's linear as well. Memory: a block's
  parameters are gathered together while it runs (T5-XXL's largest, about 0.5 GB in bf16), no
  more than the prefetch bucket of two blocks gathers anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hp_deepspeed.config import ConfigError
from hp_deepspeed.model.builder import zero_stage

GIB = 2**30
STATE_SHARE = 0.5
"""Largest share of a GPU's budget the model states of stage 0/2 may take (the rest: activations)."""
PERSIST_SHARE = 0.25
"""Largest share of a GPU's budget an always-gathered copy of the parameters may take (world size 1)."""
MAX_BUCKET = 500_000_000
"""DeepSpeed's default bucket size (elements); larger buckets only cost memory."""
MIN_PREFETCH = 50_000_000
"""DeepSpeed's default prefetch bucket (elements)."""
MULTI_RANK_PERSISTENCE = 100_000
"""DeepSpeed's default persistence threshold (elements), kept when parameters are really sharded."""
# Bytes per parameter of bf16 mixed-precision AdamW: bf16 weights (2) for every parameter; for
# each trained one a bf16 gradient (2), and fp32 master weight, gradient accumulator, m and v (16).
PARAM_BYTES, TRAINED_BYTES = 2, 18
HOST_BYTES = 4
"""Bytes per parameter of the fp32 model a rank builds on the host before DeepSpeed moves it."""


@dataclass(frozen=True)
class ModelSize:
    """What the sharding choices need to know about the model."""

    total_params: int
    """Every parameter (backbone and conditioning; tied embeddings once)."""
    trainable_params: int
    """Parameters the optimizer updates (the conditioning only with ``freeze_backbone``)."""
    largest_param: int
    """Elements of the largest single parameter tensor (the embedding for T5)."""
    block_params: int
    """Parameters of the largest T5 block (what ZeRO-3 gathers when it reaches the block)."""

    @classmethod
    def of(cls, model_cfg, cond_cfg, num_tasks: int) -> "ModelSize":
        """Count the trainer's model built on the meta device (no memory; a second for T5-XXL)."""
        from hp_deepspeed.model.hyperprompt_t5 import build_model

        return cls.of_module(build_model(model_cfg, cond_cfg, num_tasks, device="meta"))

    @classmethod
    def of_module(cls, model) -> "ModelSize":
        params = list(model.parameters())
        blocks = [m for m in model.modules() if type(m).__name__ == "T5Block"]
        return cls(
            total_params=sum(p.numel() for p in params),
            trainable_params=sum(p.numel() for p in params if p.requires_grad),
            largest_param=max(p.numel() for p in params),
            block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        )


@dataclass(frozen=True)
class Hardware:
    """The data-parallel group the model is sharded over."""

    world_size: int
    """Ranks (GPUs) that share the model."""
    gpu_mem_gib: float | None
    """Memory of one GPU as sold (80 for an H100 80GB); None on the CPU, where memory is not planned."""
    host_mem_gib: float = float("inf")
    """RAM of one node: below ZeRO-3 every rank builds the whole fp32 model there first."""
    ranks_per_node: int = 1
    """Ranks sharing that RAM."""

    @classmethod
    def detect(cls, world_size: int, on_cpu: bool) -> "Hardware":
        import os

        import psutil
        import torch

        if on_cpu or not torch.cuda.is_available():
            return cls(world_size, None)
        return cls(world_size, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB,
                   psutil.virtual_memory().total / GIB, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))

    def budget_bytes(self) -> float:
        """What the plan tool allows model states and activations on one GPU (its margins)."""
        from hp_deepspeed.tools.plan_memory import Cluster, Margins, gpu_budget_bytes

        cluster = Cluster(nodes=1, gpus_per_node=self.world_size, gpu_mem_gib=self.gpu_mem_gib, cpu_mem_gib=0.0)
        return gpu_budget_bytes(cluster, Margins())


def state_bytes(size: ModelSize, stage: int, world_size: int) -> float:
    """Model-state bytes per GPU of bf16 mixed-precision AdamW at a ZeRO stage."""
    params, trained = PARAM_BYTES * size.total_params, TRAINED_BYTES * size.trainable_params
    if stage == 3:
        return (params + trained) / world_size
    if stage in (1, 2):
        return params + trained / world_size
    return params + trained


def choose_stage(size: ModelSize, hw: Hardware) -> tuple[int, str]:
    """(ZeRO stage, the reason in words)."""
    low = 0 if hw.world_size == 1 else 2
    if hw.gpu_mem_gib is None:
        # CPU runs (tests, demos) have no device memory to save, and gloo has no reduce-scatter
        # for stage 2: replicate.
        return 0, "CPU: nothing to shard for"
    budget = hw.budget_bytes()
    need = {stage: state_bytes(size, stage, hw.world_size) for stage in (low, 3)}
    host_need = HOST_BYTES * size.total_params * hw.ranks_per_node  # zero.Init avoids this at stage 3
    if host_need > STATE_SHARE * hw.host_mem_gib * GIB:
        return 3, (f"below ZeRO-3 the {hw.ranks_per_node} rank(s) of a node would build {host_need / GIB:.0f} GiB "
                   f"of fp32 weights in its {hw.host_mem_gib:.0f} GiB of RAM")
    if need[low] <= STATE_SHARE * budget:
        stage = low
    else:  # the smaller states; on one GPU ZeRO-3 shards nothing, so the cheaper stage 0 stays
        stage = 3 if need[3] < need[low] else low
    return stage, (f"model states per GPU: {need[low] / GIB:.1f} GiB at stage {low}, {need[3] / GIB:.1f} GiB at "
                   f"stage 3; {STATE_SHARE:.0%} of the {budget / GIB:.1f} GiB budget is {STATE_SHARE * budget / GIB:.1f} GiB")


def sizes(size: ModelSize | None, d_model: int, hw: Hardware) -> dict[str, int]:
    """Bucket, prefetch and persistence sizes (elements); without a ModelSize, from d_model alone."""
    if size is None:  # callers that do not count the model: a t5-large-like guess from d_model
        block = 12 * d_model * d_model
        size = ModelSize(total_params=100 * block, trainable_params=100 * block, largest_param=32 * d_model * d_model,
                         block_params=block)
    bucket = int(min(MAX_BUCKET, max(d_model * d_model, size.trainable_params // 4)))
    persistence = MULTI_RANK_PERSISTENCE
    if hw.world_size == 1 and (hw.gpu_mem_gib is None
                               or PARAM_BYTES * size.total_params <= PERSIST_SHARE * hw.budget_bytes()):
        persistence = size.largest_param + 1  # every parameter stays gathered: one rank shards nothing
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": int(min(MAX_BUCKET, max(MIN_PREFETCH, 2 * size.block_params))),
        "stage3_param_persistence_threshold": int(persistence),
    }


def choose_zero(size: ModelSize, hw: Hardware) -> dict[str, Any]:
    """Everything the project chooses for a model on a group of GPUs (reported by bench/gpu.py)."""
    stage, reason = choose_stage(size, hw)
    return {"stage": stage, "reason": reason, **sizes(size, 0, hw)}


def resolve_zero(zero: dict, *, d_model: int, hw: Hardware, model_size: ModelSize | None) -> None:
    """Replace the ``"auto"`` values of a ``zero_optimization`` section in place."""
    if zero.get("stage") == "auto":
        if model_size is None:
            raise ConfigError('zero_optimization.stage "auto" needs the model size; pass model_size to build_ds_config')
        zero["stage"] = choose_stage(model_size, hw)[0]
    for key, value in sizes(model_size, d_model, hw).items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("stage") == 3:
        zero.setdefault("memory_efficient_linear", False)  # torch's linear (module docstring)


def mark_leaf_blocks(model, ds_config: dict[str, Any], enabled: bool = True) -> int:
    """Under ZeRO-3, make the model's T5 blocks DeepSpeed leaf modules (see the module
    docstring); returns how many were marked. Call it before ``deepspeed.initialize``, which
    registers the hooks. A no-op below stage 3 or when ``enabled`` is false."""
    if not enabled or zero_stage(ds_config) != 3:
        return 0
    from deepspeed.utils import set_z3_leaf_module

    blocks = model.zero3_leaf_blocks()
    for block in blocks:
        set_z3_leaf_module(block, True)
    return len(blocks)
