"""The fidelity study on a cluster: each cell a run of the project's own trainer, one job per cell.

    python -m bench.fidelity_cluster cells  --config C [study options]          # how many cells
    python -m bench.fidelity_cluster cell   --config C --index I [study options] # cell I's overrides
    python -m bench.fidelity_cluster report --config C [study options]          # statistics and report

slurm/fidelity.sbatch drives it: array task ``I`` runs ``hp-deepspeed train --config C`` with
the overrides ``cell`` prints (``conditioning.variant``, ``optim.lr``, ``run.seed``, every task
evaluated on the dev and the test split, ``run.dir`` = ``OUT/cells/<variant>-lr<lr>-seed<s>``),
so a cell is what a user runs, with its checkpoints, preemption and ``--resume auto``. The
last job reads every cell's ``metrics.jsonl`` and reports with the statistics of
``python -m bench.fidelity`` (bench/fidelity.py): the rate chosen on the dev split, per task the
evaluation with the best dev score (the trainer evaluates every ``eval.every`` steps: the
paper's best checkpoint per task), mean ± std and 95% intervals over seeds, Welch tests against
the MTL baseline with Holm's adjustment, detectable differences, the three-outcome ordering.

The variants are the trainer's (``conditioning.variant``; ``mtl`` switches the task prefix
on). The CPU miniature's power control (task ids shuffled per example) is a study-only
training change and is not a trainer variant, so it is not a cell here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

from bench import fidelity
from hp_deepspeed.data.tasks import eval_set_name

CLUSTER_VARIANTS = ["mtl", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global", "hyperformer", "none"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["cells", "cell", "report"])
    parser.add_argument("--config", required=True, help="the base job config of every cell (hp-deepspeed train --config)")
    parser.add_argument("--index", type=int, default=None, help="the cell (with action 'cell'), variant-major")
    parser.add_argument("--variants", nargs="+", default=CLUSTER_VARIANTS, choices=CLUSTER_VARIANTS)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--dev-split", default="dev", help="split the rate and checkpoint are chosen on")
    parser.add_argument("--test-split", default="validation", help="split reported")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/fidelity-cluster"))
    parser.add_argument("--doc", type=Path, default=Path("docs/fidelity-cluster.md"))
    args = parser.parse_args(argv)
    if args.dev_split == args.test_split:
        parser.error(f"--dev-split and --test-split are both {args.dev_split!r}: the rate must be chosen on a "
                     "split that is not the reported one")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    n = len(args.variants) * len(args.lrs) * len(args.seeds)
    if args.action == "cell" and (args.index is None or not 0 <= args.index < n):
        parser.error(f"--index {args.index}: expected 0..{n - 1} "
                     f"({len(args.variants)} variants x {len(args.lrs)} rates x {len(args.seeds)} seeds)")
    return args


def job_tasks(config: str) -> list[str]:
    """The task names of the base config (registry tasks, then custom ones)."""
    from hp_deepspeed.config import load_config
    from hp_deepspeed.training.train_config import JobConfig

    job = load_config(JobConfig, [config], [])
    return list(job.data.tasks) + [c.name for c in job.data.custom_tasks]


def cells(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    return [(v, lr, s) for v in args.variants for lr in args.lrs for s in args.seeds]


def cell_dir(out_dir: Path, variant: str, lr: float, seed: int) -> Path:
    return out_dir / "cells" / f"{variant}-lr{lr:g}-seed{seed}"


def cell_overrides(args: argparse.Namespace, index: int) -> list[str]:
    """The ``hp-deepspeed train`` overrides of one cell."""
    variant, lr, seed = cells(args)[index]
    splits = "{" + ", ".join(f"{t}: [{args.dev_split}, {args.test_split}]" for t in job_tasks(args.config)) + "}"
    return [f"conditioning.variant={variant}", f"optim.lr={lr:g}", f"run.seed={seed}", f"data.seed={seed}",
            f"data.eval_splits={splits}", f"run.dir={cell_dir(args.out_dir, variant, lr, seed)}"]


def cell_record(run_dir: Path, variant: str, lr: float, seed: int, tasks: Sequence[str], dev: str, test: str) -> dict | None:
    """A finished cell as bench.fidelity's record: one point per evaluation in metrics.jsonl
    (dev and test score per task); None while the run has not evaluated both splits."""
    from hp_deepspeed.training.metrics_log import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    points = []
    for r in read_metrics(path):
        if r.get("kind") != "eval":
            continue
        primary = {k[: -len("/score")]: v for k, v in r.items() if k.endswith("/score")}
        names = [eval_set_name(t, (dev, test), split) for t in tasks for split in (dev, test)]
        if all(n in primary for n in names):
            points.append({"step": r["step"], **fidelity.split_scores(primary, tasks, dev, test)})
    if not points:
        return None
    train = [r for r in read_metrics(path) if r.get("kind") == "train"]
    # wall time per step between consecutive train records (evaluations and restarts included)
    steps = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(train, train[1:]) if b["step"] > a["step"]]
    backbone, conditioning = parameter_counts(run_dir)
    return {"variant": variant, "lr": lr, "seed": seed, "points": points,
            "trainable_params": backbone + conditioning, "conditioning_params": conditioning,
            "step_time_ms": 1000 * statistics.median(steps) if steps else 0.0}


def parameter_counts(run_dir: Path) -> tuple[int, int]:
    """(backbone, conditioning) parameters of the run's saved config, counted on the meta device."""
    from hp_deepspeed.config import from_dict, read_yaml
    from hp_deepspeed.model.param_report import count_parameters
    from hp_deepspeed.training.train_config import JobConfig

    job = from_dict(JobConfig, read_yaml(run_dir / "config.yaml"))
    row = count_parameters(job.model.name_or_path, job.conditioning, len(job.data.tasks) + len(job.data.custom_tasks))
    return row.backbone, row.conditioning


def report(args: argparse.Namespace) -> int:
    tasks = job_tasks(args.config)
    records = [r for v, lr, s in cells(args)
               if (r := cell_record(cell_dir(args.out_dir, v, lr, s), v, lr, s, tasks, args.dev_split,
                                    args.test_split)) is not None]
    if not records:
        print(f"fidelity_cluster: no finished cell under {args.out_dir}/cells", file=sys.stderr)
        return 1
    selected = fidelity.select(records)
    header = (f"{len(records)} of {len(cells(args))} cells finished; each cell is `hp-deepspeed train --config "
              f"{args.config}` with the overrides of `python -m bench.fidelity_cluster cell`.")
    cfg_text = (f"Tasks {', '.join(tasks)}; learning-rate grid {', '.join(f'{x:g}' for x in args.lrs)}, the same for "
                f"every variant, chosen on the `{args.dev_split}` split; seeds {', '.join(map(str, args.seeds))}; "
                f"scores on the `{args.test_split}` split, per task at the evaluation with the best dev score.")
    command = "python -m bench.fidelity_cluster " + " ".join(sys.argv[1:])
    text = fidelity.report_markdown(cfg_text, selected, command, header, None)
    fidelity.write_doc(args.doc, text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.action == "cells":
        print(len(cells(args)))
    elif args.action == "cell":
        print("\n".join(cell_overrides(args, args.index)))
    else:
        return report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
