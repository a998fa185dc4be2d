"""``hp-deepspeed report RUN_DIR``: PNG plots of a run's ``metrics.jsonl``.

Writes into ``RUN_DIR/report/``:

* ``loss.png``: the overall training loss and, in a second panel, each task's loss
  (``loss/<task>``), against the optimizer step;
* ``eval_<benchmark>.png``: one figure per benchmark (``glue/rte`` -> ``glue``; see
  ``eval_series``), one panel per eval set with each of its metrics, plus a last panel with
  ``<benchmark>_average`` when the evaluator logged it (``glue_average``, ``superglue_average``).

With ``--baseline OTHER_RUN_DIR`` it also prints the closing table of the run's last
evaluation beside another run's (the demo's unconditioned model): per eval set the primary
score (``<set>/score``), the average of the scored sets, and the GLUE/SuperGLUE sets of a run
on the bundled files (``data.data_dir: null``) listed apart as format checks, since those files
hold a dozen invented rows and their scores mean nothing.

The file is read with ``read_metrics``, which keeps the last record of each (kind, step), so a
resumed run that re-logged the steps after its checkpoint is plotted once, with the resumed
values. Only matplotlib's Agg backend is used: it needs no display, as on a cluster login node.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from hp_deepspeed.errors import ReportError
from hp_deepspeed.training.metrics_log import read_metrics

# The keys plotted here; the other train values (lr, throughput, memory) are in TensorBoard.
_LOSS_KEY = "loss"
_TASK_LOSS_PREFIX = "loss/"
_AVERAGE_SUFFIX = "_average"
# Figure of the eval sets that belong to no benchmark (custom tasks).
_OTHER_TASKS = "tasks"


Series = dict[str, tuple[list[int], list[float]]]


def _series(records: list[dict], kind: str, keep) -> Series:
    """``{key: (steps, values)}`` for the numeric keys of ``kind`` records that ``keep(key)``."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for record in records:  # read_metrics returns them sorted by step
        if record.get("kind") != kind:
            continue
        for key, value in record.items():
            if key in ("kind", "step", "time") or not keep(key):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # a NaN loss is a fact of the run, but it cannot be drawn
            steps, values = out[key]
            steps.append(int(record["step"]))
            values.append(float(value))
    return dict(out)


def loss_series(records: list[dict]) -> tuple[Series, Series]:
    """(overall loss, per-task losses keyed by task name) from the train records."""
    overall = _series(records, "train", lambda k: k == _LOSS_KEY)
    per_task = _series(records, "train", lambda k: k.startswith(_TASK_LOSS_PREFIX))
    return overall, {k[len(_TASK_LOSS_PREFIX):]: v for k, v in per_task.items()}


def eval_series(records: list[dict]) -> dict[str, dict[str, Series]]:
    """``{benchmark: {panel: {metric: (steps, values)}}}`` from the eval records.

    The evaluator logs ``"<eval set>/<metric>"`` with eval sets named ``<benchmark>/<task>``
    (``"glue/rte/accuracy"``, ``"glue/mnli_matched/accuracy"``) and ``"<benchmark>_average"``.
    The metric is what follows the last ``/``; the benchmark is the eval set's first component.
    An eval set without ``/`` (a custom task, or the older ``glue_rte`` spelling) belongs to
    benchmark ``b`` when it starts with ``b_`` and ``b_average`` was logged, else to ``tasks``.
    Averages are drawn in their benchmark's figure, as the last panel.
    """
    flat = _series(records, "eval", lambda k: "/" in k or k.endswith(_AVERAGE_SUFFIX))
    averaged = {k[: -len(_AVERAGE_SUFFIX)] for k in flat if "/" not in k}
    grouped: dict[str, dict[str, Series]] = defaultdict(lambda: defaultdict(dict))
    for key, series in flat.items():
        if "/" not in key:
            grouped[key[: -len(_AVERAGE_SUFFIX)]][key]["average"] = series
            continue
        task, metric = key.rsplit("/", 1)
        if "/" in task:
            benchmark = task.split("/", 1)[0]
        else:
            benchmark = next((b for b in sorted(averaged) if task.startswith(f"{b}_")), _OTHER_TASKS)
        grouped[benchmark][task][metric] = series
    return {b: dict(panels) for b, panels in grouped.items()}


def _figure(n_panels: int, title: str):
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; no-op when Agg is already selected
    import matplotlib.pyplot as plt

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows), squeeze=False)
    fig.suptitle(title)
    flat_axes = [ax for row in axes for ax in row]
    for ax in flat_axes[n_panels:]:
        ax.set_visible(False)
    return plt, fig, flat_axes[:n_panels]


def _draw(ax, series: Series, title: str, ylabel: str) -> None:
    for label, (steps, values) in sorted(series.items()):
        # Markers too: evaluation is often only a handful of points, which a bare line hides.
        ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or title.endswith("average"):
        ax.legend(fontsize="small", ncol=2 if len(series) > 8 else 1)  # 16 GLUE+SuperGLUE tasks


def write_report(run_dir: str | Path) -> list[Path]:
    """Plot ``RUN_DIR/metrics.jsonl`` into ``RUN_DIR/report/``; returns the PNG paths written."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory (expected a run directory)")
    if not metrics.is_file():
        raise ReportError(
            f"{run_dir} has no metrics.jsonl: it is written by rank 0 of `hp-deepspeed train` into "
            f"run.dir (is this the run directory, and has the run logged its first step?)"
        )
    try:
        records = read_metrics(metrics)
    except (ValueError, KeyError) as err:
        raise ReportError(f"{metrics} is not a valid metrics file ({type(err).__name__}: {err})") from None
    overall, per_task = loss_series(records)
    benchmarks = eval_series(records)
    if not overall and not per_task and not benchmarks:
        raise ReportError(f"{metrics} holds no training loss and no evaluation metrics to plot")

    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []

    if overall or per_task:
        panels = [s for s in (overall, per_task) if s]
        plt, fig, axes = _figure(len(panels), f"training loss: {run_dir.name}")
        if overall:
            _draw(axes[0], overall, "overall", "loss (per target token)")
        if per_task:
            _draw(axes[-1], per_task, "per task", "loss (per target token)")
        written.append(_save(plt, fig, out_dir / "loss.png"))

    for benchmark, panels in sorted(benchmarks.items()):
        # Task panels alphabetically, the benchmark average last.
        names = sorted(panels, key=lambda p: (p.endswith(_AVERAGE_SUFFIX), p))
        plt, fig, axes = _figure(len(names), f"evaluation: {benchmark} ({run_dir.name})")
        for ax, name in zip(axes, names):
            _draw(ax, panels[name], name, "score")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", benchmark)
        written.append(_save(plt, fig, out_dir / f"eval_{safe}.png"))
    return written


_SCORE_SUFFIX = "/score"


def final_scores(run_dir: Path) -> tuple[int, dict[str, float]]:
    """(step, {eval set: primary score}) of the run's last evaluation."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    evals = [r for r in read_metrics(metrics) if r.get("kind") == "eval"]
    if not evals:
        raise ReportError(f"{metrics} holds no evaluation (set eval.every or let the run finish)")
    last = evals[-1]
    return int(last["step"]), {k[: -len(_SCORE_SUFFIX)]: float(v) for k, v in last.items() if k.endswith(_SCORE_SUFFIX)}


def _variant_and_format_checks(run_dir: Path, eval_sets) -> tuple[str, set[str]]:
    """The run's conditioning variant, and its eval sets that only check formats: GLUE/SuperGLUE
    sets read from the bundled files (a dozen invented rows each)."""
    import yaml

    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    data = config.get("data") or {}
    variant = (config.get("conditioning") or {}).get("variant", "?")
    bundled = data.get("data_dir") is None and not data.get("hub")
    checks = {s for s in eval_sets if bundled and s.split("/", 1)[0] in ("glue", "superglue")}
    return variant, checks


def closing_table(run_dir: str | Path, baseline_dir: str | Path) -> str:
    """The run's last evaluation beside the baseline's (see the module docstring)."""
    run_dir, baseline_dir = Path(run_dir), Path(baseline_dir)
    step, ours = final_scores(run_dir)
    base_step, theirs = final_scores(baseline_dir)
    variant, checks = _variant_and_format_checks(run_dir, ours)
    base_variant, _ = _variant_and_format_checks(baseline_dir, theirs)
    scored = [s for s in sorted(ours) if s not in checks]
    columns = (f"{variant} (step {step})", f"{base_variant} (step {base_step})")
    w = max(12, *(len(c) + 2 for c in columns))

    def row(name: str, a: float, b: float, indent: str = "") -> str:
        return f"{indent}{name:<{24 - len(indent)}} {a:>{w}.1f} {b:>{w}.1f}"

    head = f"{'eval set':<24} {columns[0]:>{w}} {columns[1]:>{w}}"
    lines = [head, "-" * len(head)]
    lines += [row(name, ours[name], theirs.get(name, float("nan"))) for name in scored]
    if scored:
        base = [theirs[s] for s in scored if s in theirs]
        base_mean = sum(base) / len(base) if len(base) == len(scored) else float("nan")
        lines.append(row("average", sum(ours[s] for s in scored) / len(scored), base_mean))
    if checks:
        lines.append("format checks (bundled GLUE/SuperGLUE files: a dozen invented rows, not a benchmark score):")
        lines += [row(name, ours[name], theirs.get(name, float("nan")), "  ") for name in sorted(checks)]
    return "\n".join(lines)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="run directory holding metrics.jsonl (the trainer's run.dir)")
    parser.add_argument("--baseline", metavar="OTHER_RUN_DIR", type=Path, default=None,
                        help="also print the last evaluation beside this run's (e.g. the unconditioned model)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = write_report(args.run_dir)
        table = closing_table(args.run_dir, args.baseline) if args.baseline else None
    except ReportError as err:
        print(f"hp-deepspeed report: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if table:
        print(table)
    return 0
