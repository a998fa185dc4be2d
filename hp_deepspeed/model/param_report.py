"""How many parameters each conditioning variant adds to each T5, counted on the meta device.

    python -m hp_deepspeed.model.param_report                      # defaults, the docs' table
    python -m hp_deepspeed.model.param_report --presets google/t5-v1_1-xxl --set bottleneck=16

Models are built with ``build_model(..., device="meta")``: shapes only, no memory, so T5-11B and
T5-XXL are counted in a second on a laptop. The ratio is conditioning / backbone parameters, the
paper's "additional task-conditioning parameters" (tied embeddings are counted once).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Sequence, get_args

from hp_deepspeed.config import apply_override, from_dict, to_dict
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.conditioning import UNCONDITIONED_VARIANTS, ConditioningConfig, Variant
from hp_deepspeed.model.hyperprompt_t5 import build_model

DEFAULT_PRESETS = ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b", "google/t5-v1_1-xxl")
DEFAULT_VARIANTS = tuple(v for v in get_args(Variant) if v not in UNCONDITIONED_VARIANTS)
# GLUE and SuperGLUE are each trained as one mixture of 8 tasks in the paper.
DEFAULT_NUM_TASKS = 8


@dataclass
class ParamRow:
    """One (preset, variant) count."""

    preset: str
    variant: str
    backbone: int
    """Backbone parameters (tied embeddings once)."""
    conditioning: int
    """Conditioning parameters (hypernetworks, embeddings, prompts, tables)."""

    @property
    def ratio(self) -> float:
        return self.conditioning / self.backbone


def count_parameters(
    preset: str, cond_cfg: ConditioningConfig, num_tasks: int = DEFAULT_NUM_TASKS
) -> ParamRow:
    model = build_model(ModelConfig(name_or_path=preset, load_weights=False), cond_cfg, num_tasks, device="meta")
    backbone = sum(p.numel() for p in model.backbone.parameters())
    conditioning = 0 if model.conditioning is None else sum(p.numel() for p in model.conditioning.parameters())
    return ParamRow(preset, cond_cfg.variant, backbone, conditioning)


def parameter_report(
    presets: Sequence[str] = DEFAULT_PRESETS,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    base: ConditioningConfig | None = None,
    num_tasks: int = DEFAULT_NUM_TASKS,
) -> list[ParamRow]:
    """Counts for every preset and variant, all other settings from ``base`` (default: defaults)."""
    base = base or ConditioningConfig()
    return [
        count_parameters(preset, dataclasses.replace(base, variant=variant), num_tasks)
        for preset in presets
        for variant in variants
    ]


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"


def format_table(rows: Sequence[ParamRow]) -> str:
    """A markdown table: one line per preset, conditioning parameters (and % of backbone) per variant."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    presets = list(dict.fromkeys(r.preset for r in rows))
    by_key = {(r.preset, r.variant): r for r in rows}
    lines = [
        "| preset | backbone | " + " | ".join(variants) + " |",
        "|---|---:|" + "---:|" * len(variants),
    ]
    for preset in presets:
        cells = [f"{_millions(by_key[preset, v].conditioning)} ({100 * by_key[preset, v].ratio:.3f}%)" for v in variants]
        lines.append(f"| {preset} | {_millions(by_key[preset, variants[0]].backbone)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(DEFAULT_VARIANTS))
    parser.add_argument("--num-tasks", type=int, default=DEFAULT_NUM_TASKS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a ConditioningConfig field, e.g. --set bottleneck=16 (repeatable)")
    args = parser.parse_args(argv)
    tree = to_dict(ConditioningConfig())
    for override in args.overrides:
        apply_override(tree, override)
    base = from_dict(ConditioningConfig, tree)
    settings = ", ".join(
        f"{k}={v}" for k, v in to_dict(base).items()
        if k in ("prompt_length", "bottleneck", "task_embedding_dim", "layer_embedding_dim",
                 "projector_hidden_dim", "hyper_embedding_dim", "placement")
    )
    print(f"Conditioning parameters, {args.num_tasks} tasks, {settings}; % of the backbone in brackets.\n")
    print(format_table(parameter_report(args.presets, args.variants, base, args.num_tasks)))


if __name__ == "__main__":
    main()
