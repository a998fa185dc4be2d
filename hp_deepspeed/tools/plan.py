"""``hp-deepspeed plan``: will a T5 + HyperPrompt run fit, and with which settings?

Before a multi-node job is queued this answers, for one model and one cluster shape:

* how much GPU memory per GPU and CPU memory per node the ZeRO-3 *model states* (bf16
  parameters, gradients, fp32 master weights and Adam moments) need without offload, with the
  optimizer offloaded to the CPU, and with optimizer and parameters offloaded. These numbers are
  DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs``) fed with the parameter
  count of the real model built on the meta device -- backbone *and* task conditioning;
* how much activation memory one micro-batch needs at the given input/target lengths, with and
  without per-block activation checkpointing (``activation_bytes`` below derives it term by
  term from what our T5 saves for backward);
* the largest micro-batch that fits in each setting within a safety margin, and a suggestion:
  the cheapest offload that fits CPU memory, and checkpointing only when it is needed.

Everything is an estimate for planning: measure the first steps of a real run (the trainer logs
``mem_peak_gib``) before scaling out. All "GB" in this tool are GiB (2**30 bytes), the unit
DeepSpeed's estimator prints.

    hp-deepspeed plan --preset google/t5-v1_1-xxl --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 \\
        --cpu-mem-gb 1024 --input-len 512 --target-len 128

This module owns the table (``format_plan``) and the command line; the measurement of the model
is ``plan_model.py`` and the arithmetic ``plan_memory.py``, whose public names are imported here
so that ``from hp_deepspeed.tools import plan`` reaches the whole planner.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from hp_deepspeed.tools.plan_memory import (
    GIB,
    OFFLOAD_DS_CONFIG,
    OFFLOAD_MODES,
    ActivationEstimate,
    Cluster,
    Margins,
    Workload,
    activation_bytes,
    block_activation_bytes,
    gpu_budget_bytes,
    make_plan,
    max_micro_batch,
    model_states_bytes,
    offload_option,
    suggest,
)
from hp_deepspeed.tools.plan_model import ModelSpec, count_params, load_model_spec

__all__ = [  # the planner's public names (see the module docstring)
    "GIB", "OFFLOAD_DS_CONFIG", "OFFLOAD_MODES", "ActivationEstimate", "Cluster", "Margins", "ModelSpec",
    "Workload", "activation_bytes", "block_activation_bytes", "count_params", "format_plan",
    "gpu_budget_bytes", "load_model_spec", "make_plan", "max_micro_batch", "model_states_bytes",
    "offload_option", "plan_from_args", "add_arguments", "run", "suggest",
]


def format_plan(plan: dict) -> str:
    """The human-readable form of ``make_plan``'s result."""
    m, c, w = plan["model"], plan["cluster"], plan["workload"]
    lines = [
        f"model    {m['name']}  conditioning={m['variant']} ({m['num_tasks']} tasks)",
        f"         {m['total_params'] / 1e9:.3f}B parameters = {m['backbone_params'] / 1e9:.3f}B backbone"
        f" + {m['conditioning_params'] / 1e6:.2f}M conditioning;"
        f" largest layer {m['largest_layer']} {m['largest_layer_params'] / 1e6:.1f}M",
        f"cluster  {c['nodes']} node(s) x {c['gpus_per_node']} GPUs x {c['gpu_mem_gib']:g} GB,"
        f" {c['cpu_mem_gib']:g} GB CPU RAM per node ({c['num_gpus']} GPUs)",
        f"workload input {w['input_len']} + target {w['target_len']} tokens, bf16, dropout {w['dropout']:g}"
        + (f", {m['kv_prompt_len']} key/value prompt slots" if m["kv_prompt_len"] else "")
        + (f", {m['input_prompt_len']} soft input tokens" if m["input_prompt_len"] else ""),
        f"budget   {plan['gpu_budget_gib']:.1f} GB per GPU for model states + activations"
        f" ({plan['margins']['gpu_fraction']:.0%} margin, {plan['margins']['gpu_reserved_gib']:g} GB reserved)",
        "",
        "activations per example (GB, peak incl. backward transient):"
        f" {plan['activations_per_example_gib']['no_checkpointing']['peak']:.3f} without,"
        f" {plan['activations_per_example_gib']['checkpointing']['peak']:.3f} with per-block checkpointing",
        "",
    ]
    header = ("offload", "GPU states/GPU", "GPU states/node", "CPU/node", "CPU fits", "max mb", "max mb ckpt")
    rows = [header]
    for o in plan["options"]:
        rows.append((
            o["offload"], f"{o['gpu_model_states_gib']:.2f} GB", f"{o['gpu_model_states_per_node_gib']:.1f} GB",
            f"{o['cpu_per_node_gib']:.1f} GB", "yes" if o["cpu_fits"] else "NO",
            str(o["max_micro_batch"] or "-"), str(o["max_micro_batch_checkpointed"] or "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    lines.append("")
    s = plan["suggestion"]
    if s is None:
        lines.append("suggestion: does NOT fit with any offload mode; use more nodes, shorter sequences "
                     "or NVMe offload (ds_configs/zero3_offload_nvme.json)")
    else:
        lines.append(
            f"suggestion: offload={s['offload']} ({s['ds_config']}), training.micro_batch_size={s['micro_batch']}, "
            f"model.activation_checkpointing={'non_reentrant' if s['activation_checkpointing'] else 'none'}"
        )
        lines.append(f"            ~{s['gpu_estimate_gib']:.1f} of {c['gpu_mem_gib']:g} GB per GPU (incl. the reserve), "
                     f"{s['cpu_per_node_gib']:.1f} of {c['cpu_mem_gib']:g} GB CPU per node")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="preset name: t5-small ... t5-11b, google/t5-v1_1-{small..xxl}, "
                                         "google/flan-t5-*, google/mt5-*, tiny-v1_1 ...")
    source.add_argument("--config", help="a local Hugging Face config.json (or the folder holding it)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU (GiB)")
    parser.add_argument("--cpu-mem-gb", type=float, default=1024.0, help="CPU RAM per node (GiB)")
    parser.add_argument("--input-len", type=int, default=512, help="padded encoder length in tokens")
    parser.add_argument("--target-len", type=int, default=128, help="padded decoder length in tokens")
    parser.add_argument("--dropout", type=float, default=None,
                        help="backbone dropout rate (default: the model config's, 0.1 for the presets)")
    from hp_deepspeed.model.conditioning import Variant

    parser.add_argument("--variant", default="hyperprompt_global", choices=typing.get_args(Variant),
                        help="task-conditioning variant (conditioning.variant)")
    parser.add_argument("--num-tasks", type=int, default=8, help="tasks the conditioning is built for")
    parser.add_argument("--prompt-length", type=int, default=None,
                        help="conditioning.prompt_length (default: ConditioningConfig's)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="check this micro-batch size instead of searching for the largest")
    parser.add_argument("--max-micro-batch", type=int, default=256, help="upper end of the micro-batch search")
    parser.add_argument("--gpu-margin", type=float, default=Margins.gpu_fraction,
                        help="fraction of GPU memory kept free")
    parser.add_argument("--gpu-reserved-gb", type=float, default=Margins.gpu_reserved_gib,
                        help="GiB per GPU for CUDA context, NCCL and workspaces")
    parser.add_argument("--cpu-margin", type=float, default=Margins.cpu_fraction,
                        help="fraction of node RAM kept free")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_from_args(args: argparse.Namespace) -> dict:
    for name in ("nodes", "gpus_per_node", "input_len", "target_len", "num_tasks", "max_micro_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    from hp_deepspeed.model.t5_config import PRESET_ALIASES, PRESETS

    if args.preset is not None and args.preset not in PRESETS and args.preset not in PRESET_ALIASES:
        # Checked here so that a typo is not taken for a hub id and fetched.
        raise ValueError(f"--preset {args.preset!r} is not a preset; known: {', '.join(PRESETS)} "
                         f"(use --config for a local config.json)")
    if args.config is not None and not Path(args.config).exists():
        raise FileNotFoundError(f"--config {args.config}: no such file or folder")
    spec = load_model_spec(args.preset or args.config, args.variant, args.num_tasks, args.prompt_length)
    dropout = spec.config.dropout_rate if args.dropout is None else args.dropout
    return make_plan(
        spec,
        Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.cpu_mem_gb),
        Workload(args.input_len, args.target_len, dropout),
        Margins(args.gpu_margin, args.gpu_reserved_gb, args.cpu_margin),
        micro_batch=args.micro_batch, max_micro_batch_limit=args.max_micro_batch,
    )


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"hp-deepspeed plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["suggestion"] is not None else 1
