"""The paper's comparison in miniature, built so that it can tell the variants apart.

    python -m bench.fidelity                               # the study of docs/fidelity.md (105 cells; its wall time is there)
    python -m bench.fidelity --variants mtl hyperprompt_global --seeds 0 1 --lrs 3e-3 --steps 100  # a quick look
    python -m bench.fidelity --cell 7 ...                  # one (variant, lr, seed) cell (an sbatch array task)
    python -m bench.fidelity --report-only ...             # the report from the cached cells

The design (docs/fidelity.md states the numbers it produced):

* **Suite** (``--tasks fidelity``, bundled, made by scripts/make_bundled_data.py): seven tasks
  in two input families. Word sequences shared by ``copy``, ``first``, ``last``, ``count`` (an
  unrelated output: the number of words) and the low-resource ``reverse`` (100 training rows,
  the structure of ``copy``); template sentences shared by ``object`` and the low-resource
  ``place`` (100 rows). Each task has a ``validation`` split (the dev split: learning rate and
  checkpoint are chosen on it) and a ``test`` split (the one reported).
* **Variants** (``STUDY_VARIANTS``): ``mtl``, the paper's multi-task baseline (the plain
  backbone, each input prefixed with ``"<task>: "``); HyperPrompt ``share``, ``sep``,
  ``global`` and HyperFormer++, told the task by their conditioning only; two controls:
  ``none`` (the plain backbone told nothing, an illustration of why task information is
  needed: on tasks that share inputs it cannot exceed 100/k) and ``global_shuffled``
  (HyperPrompt-Global trained with a random task id per example: the power control, which the
  study must find significantly worse than Global).
* **Tuning**: every variant trains at every rate of ``--lrs`` for every seed; a variant's rate
  is the one with the best mean dev average over seeds; only that rate's test scores are
  reported (the dev and test splits are disjoint).
* **Checkpoint**: each cell is evaluated at ``--eval-points`` evenly spaced steps (the last one
  included); per task the point with the best dev score is taken and its test score reported,
  the paper's best checkpoint per task (``--eval-points 1``: the last step).
* **Statistics** (bench/fidelity_stats.py): per task and on the average over tasks, mean ± std
  over seeds and the 95% Student-t interval; Welch's t-test of every variant against ``mtl``
  and of Global against Share, Sep and HyperFormer++, with Holm-adjusted p-values over that
  family; the smallest difference each comparison could detect (80% power at 5%); the paper's
  ordering checked as agrees / tie / disagrees.

Each cell trains in one process without DeepSpeed (one CPU thread or one GPU: the models
compared here fit one device) and writes ``OUT/cells/<variant>-lr<lr>-seed<s>-<key>.json``
atomically; the key fingerprints every setting, so an interrupted study continues where it
stopped and a changed setting is never mixed with stale cells. The report is written from the
cells present; slurm/fidelity.sbatch runs the same design as a job array of ``hp-deepspeed
train`` runs on GLUE/SuperGLUE and reports through ``report_from_records``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

from bench import fidelity_stats as fs
from hp_deepspeed.data.config import DataConfig
from hp_deepspeed.data.tasks import FIDELITY_TASKS, eval_set_name


@dataclasses.dataclass(frozen=True)
class StudyVariant:
    """A row of the study: a conditioning variant plus how the task reaches the model."""

    conditioning: str
    task_prefix: bool = False
    """The input text names the task (the multi-task baseline)."""
    shuffle_task_ids: bool = False
    """Training examples carry a random task id (the power control)."""
    label: str = ""


STUDY_VARIANTS = {
    "mtl": StudyVariant("none", task_prefix=True, label="MTL baseline (task prefix)"),
    "hyperprompt_share": StudyVariant("hyperprompt_share", label="HyperPrompt-Share"),
    "hyperprompt_sep": StudyVariant("hyperprompt_sep", label="HyperPrompt-Sep"),
    "hyperprompt_global": StudyVariant("hyperprompt_global", label="HyperPrompt-Global"),
    "hyperformer": StudyVariant("hyperformer", label="HyperFormer++"),
    "prompt_tuning": StudyVariant("prompt_tuning", label="Prompt-Tuning"),
    "kv_prompt": StudyVariant("kv_prompt", label="stored key/value prompts"),
    "adapter": StudyVariant("adapter", label="Adapter"),
    "none": StudyVariant("none", label="no task information (illustration)"),
    "global_shuffled": StudyVariant("hyperprompt_global", shuffle_task_ids=True,
                                    label="Global, task ids shuffled (power control)"),
}
DEFAULT_VARIANTS = ["mtl", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global", "hyperformer", "none",
                    "global_shuffled"]
BASELINE = "mtl"
SUITES = {
    "fidelity": [f"fidelity/{t}" for t in FIDELITY_TASKS],
    "glue": ["glue/cola", "glue/sst2", "glue/mrpc", "glue/qqp", "glue/stsb", "glue/mnli", "glue/qnli", "glue/rte"],
    "superglue": ["superglue/boolq", "superglue/cb", "superglue/copa", "superglue/multirc", "superglue/record",
                  "superglue/rte", "superglue/wic", "superglue/wsc"],
}
# The paper's claims (He et al. 2022, Tables 1-2), each "first > second".
PAPER_CLAIMS = [
    ("hyperprompt_global", "hyperprompt_share"),
    ("hyperprompt_global", "hyperprompt_sep"),
    ("hyperprompt_share", "hyperprompt_sep"),
    ("hyperprompt_global", "hyperformer"),
    ("hyperprompt_global", "mtl"),
    ("hyperprompt_share", "mtl"),
    ("hyperprompt_sep", "mtl"),
]
POWER_CONTROL = ("hyperprompt_global", "global_shuffled")


@dataclasses.dataclass
class StudyConfig:
    """One fidelity study: the suite, the backbone and the budget every cell gets."""

    model: str = "configs/models/t5-demo"
    """Preset, local folder or hub id of the backbone."""
    load_weights: bool = False
    """Load pretrained weights (a random backbone otherwise, as for the bundled suite)."""
    tasks: str = "fidelity"
    """A suite name (``fidelity``, ``glue``, ``superglue``) or comma-separated task names."""
    data_dir: str | None = None
    """Folder of the registry tasks' files; ``None`` means the bundled files."""
    hub: bool = False
    tokenizer: str | None = None
    dev_split: str = "validation"
    """Split the learning rate and the checkpoint are chosen on."""
    test_split: str = "test"
    """Split reported (must differ from ``dev_split``)."""
    steps: int = 300
    batch_size: int = 32
    warmup_fraction: float = 0.05
    """Linear warmup over this fraction of the steps, then linear decay to 0."""
    clip_grad_norm: float = 1.0
    max_input_length: int = 64
    max_target_length: int = 16
    prompt_length: int = 4
    bottleneck: int = 16
    eval_points: int = 1
    """Evaluations per cell, evenly spaced, the last step included (best per task on dev)."""
    eval_batch_size: int = 100
    max_eval_examples: int = 0
    """Examples scored per task and split (0: all)."""
    max_new_tokens: int = 8
    threads: int = 1
    """Torch threads per cell (cells run ``--jobs`` at a time)."""
    device: str = "cpu"

    def key(self) -> str:
        """Fingerprint of everything that changes a cell's result (device and threads excluded)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("threads", "device")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def task_names(self) -> list[str]:
        return list(SUITES[self.tasks]) if self.tasks in SUITES else [t.strip() for t in self.tasks.split(",") if t.strip()]


def data_config(cfg: StudyConfig, variant: str, seed: int, cache_dir: Path) -> DataConfig:
    names = cfg.task_names()
    return DataConfig(
        tasks=names, data_dir=cfg.data_dir, hub=cfg.hub, tokenizer=cfg.tokenizer,
        max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length,
        mixture="temperature", temperature=2.0, seed=seed, cache_dir=str(cache_dir),
        eval_splits={n: [cfg.dev_split, cfg.test_split] for n in names},
        task_prefix=STUDY_VARIANTS[variant].task_prefix,
    )


def split_scores(primary: dict[str, float], tasks: Sequence[str], dev: str, test: str) -> dict[str, dict[str, float]]:
    """``{"dev": {task: score}, "test": {task: score}}`` from the evaluator's per-eval-set scores."""
    return {role: {t: primary[eval_set_name(t, (dev, test), split)] for t in tasks}
            for role, split in (("dev", dev), ("test", test))}


# ------------------------------------------------------------------------------------------------
# One cell
# ------------------------------------------------------------------------------------------------


def eval_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps ending at ``steps``."""
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


def run_cell(cfg: StudyConfig, variant: str, lr: float, seed: int, out_dir: Path) -> dict:
    """Train and score one (variant, lr, seed); returns the cell's record (also written as JSON)."""
    import torch

    from hp_deepspeed.data.stream import TrainStream
    from hp_deepspeed.data.tasks import build_tasks
    from hp_deepspeed.data.tokenization import load_tokenizer
    from hp_deepspeed.model.builder import ModelConfig
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.evaluation import Evaluator
    from hp_deepspeed.training.train_config import EvalConfig

    spec = STUDY_VARIANTS[variant]
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    data_cfg = data_config(cfg, variant, seed, out_dir / "cache")
    tasks = build_tasks(data_cfg)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(name_or_path=cfg.model, load_weights=cfg.load_weights, seed=seed, dropout_rate=0.0),
        ConditioningConfig(variant=spec.conditioning, prompt_length=cfg.prompt_length, bottleneck=cfg.bottleneck),
        num_tasks=len(tasks),
    ).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    conditioning = 0 if model.conditioning is None else sum(p.numel() for p in model.conditioning.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, round(cfg.steps * cfg.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))))
    stream = TrainStream(data_cfg, tasks, tokenizer, cfg.batch_size)
    shuffler = torch.Generator().manual_seed(10_000 + seed)
    evaluator = Evaluator(EvalConfig(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                     max_examples_per_task=cfg.max_eval_examples),
                          data_cfg, tasks, tokenizer, rank=0, world_size=1)
    names = [t.name for t in tasks]
    points, step_times = [], []
    checkpoints = set(eval_steps(cfg.steps, cfg.eval_points))
    for step in range(1, cfg.steps + 1):
        model.train()
        batch = next(stream)
        if spec.shuffle_task_ids:
            batch["task_ids"] = torch.randint(len(tasks), batch["task_ids"].shape, generator=shuffler)
        batch = {k: v.to(device) for k, v in batch.items()}
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
        optimizer.step()
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        if step in checkpoints:
            model.eval()
            primary = Evaluator.primary_scores(evaluator.evaluate(model, step))
            points.append({"step": step, **split_scores(primary, names, cfg.dev_split, cfg.test_split)})
    record = {
        "key": cfg.key(), "variant": variant, "lr": lr, "seed": seed, "points": points,
        "trainable_params": sum(p.numel() for p in trainable),
        "conditioning_params": conditioning,
        # the median skips the first steps' allocator warm-up and a shared machine's spikes
        "step_time_ms": 1000 * statistics.median(step_times[min(10, len(step_times) - 1):]),
        "final_loss": float(loss.detach()),
        "device": str(device), "threads": cfg.threads,
    }
    _write_atomic(cell_path(out_dir, cfg, variant, lr, seed), json.dumps(record, indent=2) + "\n")
    return record


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cell_path(out_dir: Path, cfg: StudyConfig, variant: str, lr: float, seed: int) -> Path:
    return out_dir / "cells" / f"{variant}-lr{lr:g}-seed{seed}-{cfg.key()}.json"


def load_cell(out_dir: Path, cfg: StudyConfig, variant: str, lr: float, seed: int) -> dict | None:
    path = cell_path(out_dir, cfg, variant, lr, seed)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == cfg.key() else None


# ------------------------------------------------------------------------------------------------
# Selection: checkpoint per task, then learning rate per variant
# ------------------------------------------------------------------------------------------------


def best_point_scores(record: dict) -> dict[str, dict[str, float]]:
    """Per task, the dev and test score at the evaluation with the best dev score (the earliest
    of equal ones): the paper's best checkpoint per task, chosen without the test split."""
    points = record["points"]
    tasks = list(points[-1]["dev"])
    out = {"dev": {}, "test": {}}
    for task in tasks:
        best = max(points, key=lambda p: (p["dev"][task], -p["step"]))
        out["dev"][task], out["test"][task] = best["dev"][task], best["test"][task]
    return out


def select(records: Sequence[dict]) -> dict[str, dict]:
    """Per variant: each rate's dev average over seeds (rates with fewer seeds than the most
    complete one are not eligible), the chosen rate and its per-seed test scores."""
    by_variant: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], {}).setdefault(r["lr"], []).append(r)
    out = {}
    for variant, by_lr in by_variant.items():
        most = max(len(rows) for rows in by_lr.values())
        dev = {lr: fs.interval([statistics.fmean(best_point_scores(r)["dev"].values()) for r in rows])
               for lr, rows in sorted(by_lr.items())}
        eligible = [lr for lr, rows in by_lr.items() if len(rows) == most]
        chosen = max(sorted(eligible), key=lambda lr: dev[lr].mean)
        rows = sorted(by_lr[chosen], key=lambda r: r["seed"])
        tests = [best_point_scores(r)["test"] for r in rows]
        out[variant] = {
            "dev_by_lr": dev, "lr": chosen, "seeds": [r["seed"] for r in rows],
            "test": tests,
            "trainable_params": rows[0]["trainable_params"],
            "conditioning_params": rows[0]["conditioning_params"],
            "step_time_ms": statistics.median(r["step_time_ms"] for r in rows),
        }
    return out


def average(scores: dict[str, float]) -> float:
    return statistics.fmean(scores.values())


# ------------------------------------------------------------------------------------------------
# Statistics on the selected cells
# ------------------------------------------------------------------------------------------------


def comparisons(selected: dict[str, dict]) -> list[dict]:
    """Welch tests on the per-seed test averages: every variant against the MTL baseline, Global
    against Share/Sep/HyperFormer++ and against the power control; Holm over the family."""
    pairs = [(v, BASELINE) for v in selected if v != BASELINE and BASELINE in selected]
    pairs += [("hyperprompt_global", b) for b in ("hyperprompt_share", "hyperprompt_sep", "hyperformer")]
    pairs += [("hyperprompt_share", "hyperprompt_sep"), POWER_CONTROL]
    pairs = [p for p in dict.fromkeys(pairs) if p[0] in selected and p[1] in selected]
    rows = []
    for a, b in pairs:
        xa = [average(s) for s in selected[a]["test"]]
        xb = [average(s) for s in selected[b]["test"]]
        if len(xa) < 2 or len(xb) < 2:
            continue
        test = fs.welch(xa, xb)
        ia, ib = fs.interval(xa), fs.interval(xb)
        rows.append({"a": a, "b": b, "diff": test.diff, "t": test.t, "df": test.df, "p": test.p,
                     "mde": fs.detectable_difference(ia.std, ia.n, ib.std, ib.n)})
    for row, adjusted in zip(rows, fs.holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def per_task_vs_baseline(selected: dict[str, dict]) -> dict[str, dict[str, fs.Test]]:
    """Per variant and task, Welch's test against the MTL baseline (unadjusted, for reading)."""
    out = {}
    if BASELINE not in selected or len(selected[BASELINE]["test"]) < 2:
        return out
    base = selected[BASELINE]["test"]
    for v, s in selected.items():
        if v == BASELINE or len(s["test"]) < 2:
            continue
        out[v] = {t: fs.welch([x[t] for x in s["test"]], [x[t] for x in base]) for t in base[0]}
    return out


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def _label(v: str) -> str:
    return STUDY_VARIANTS[v].label if v in STUDY_VARIANTS else v


def _fmt_interval(i: fs.Interval) -> str:
    return f"{i.mean:.1f} ± {i.std:.1f} [{i.low:.1f}, {i.high:.1f}]"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def results_table(selected: dict[str, dict]) -> str:
    variants = list(selected)
    tasks = list(selected[variants[0]]["test"][0])
    head = "| variant | lr | " + " | ".join(t.split("/")[-1] for t in tasks) + " | **average** | trainable | conditioning | step ms |"
    lines = [head, "|---|---:|" + "---:|" * (len(tasks) + 4)]
    for v in variants:
        s = selected[v]
        cells = [_fmt_interval(fs.interval([x[t] for x in s["test"]])) for t in tasks]
        avg = _fmt_interval(fs.interval([average(x) for x in s["test"]]))
        lines.append(f"| {_label(v)} | {s['lr']:g} | " + " | ".join(cells) + f" | **{avg}** | "
                     f"{s['trainable_params']:,} | {s['conditioning_params']:,} | {s['step_time_ms']:.0f} |")
    return "\n".join(lines)


def tuning_table(selected: dict[str, dict]) -> str:
    lrs = sorted({lr for s in selected.values() for lr in s["dev_by_lr"]})
    lines = ["| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |", "|---|" + "---:|" * (len(lrs) + 1)]
    for v, s in selected.items():
        cells = []
        for lr in lrs:
            i = s["dev_by_lr"].get(lr)
            text = "-" if i is None else f"{i.mean:.1f} ± {i.std:.1f} (n={i.n})"
            cells.append(f"**{text}**" if lr == s["lr"] else text)
        lines.append(f"| {_label(v)} | " + " | ".join(cells) + f" | {s['lr']:g} |")
    return "\n".join(lines)


def comparisons_table(rows: Sequence[dict]) -> str:
    lines = ["| A | B | A - B | Welch t | df | p | p (Holm) | detectable | significant |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        sig = "yes" if r["p_holm"] < fs.ALPHA else "no"
        lines.append(f"| {_label(r['a'])} | {_label(r['b'])} | {r['diff']:+.2f} | {r['t']:.2f} | {r['df']:.1f} | "
                     f"{_p(r['p'])} | {_p(r['p_holm'])} | {r['mde']:.2f} | {sig} |")
    return "\n".join(lines)


def per_task_table(per_task: dict[str, dict[str, fs.Test]]) -> str:
    if not per_task:
        return ""
    tasks = list(next(iter(per_task.values())))
    lines = ["| variant - MTL | " + " | ".join(t.split("/")[-1] for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for v, tests in per_task.items():
        lines.append(f"| {_label(v)} | " + " | ".join(f"{x.diff:+.1f} (p {_p(x.p)})" for x in tests.values()) + " |")
    return "\n".join(lines)


def claim_lines(rows: Sequence[dict]) -> list[str]:
    by_pair = {(r["a"], r["b"]): r for r in rows}
    out = []
    for a, b in PAPER_CLAIMS:
        r = by_pair.get((a, b))
        if r is None:
            continue
        v = fs.verdict(r["diff"], r["p_holm"])
        word = {"agrees": "**agrees** (significant)", "tie": "**tie** (not significant)",
                "disagrees": "**disagrees** (significant, the other way)"}[v]
        out.append(f"- {_label(a)} > {_label(b)}: {word}; {r['diff']:+.2f} points, Holm p {_p(r['p_holm'])}, "
                   f"detectable {r['mde']:.2f}")
    control = by_pair.get(POWER_CONTROL)
    if control is not None:
        ok = fs.verdict(control["diff"], control["p_holm"]) == "agrees"
        out += ["", f"Power control: {_label(POWER_CONTROL[0])} - {_label(POWER_CONTROL[1])} = "
                f"{control['diff']:+.2f} points, Holm p {_p(control['p_holm'])}: "
                + ("significantly worse, as it must be." if ok else
                   "**not significantly worse: this study cannot be trusted to find differences.**")]
    return out


def detectable_summary(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    values = sorted(r["mde"] for r in rows if math.isfinite(r["mde"]))
    return (f"The smallest difference of the task average these comparisons can detect (two-sided Welch test, "
            f"5% level, 80% power, the measured spreads): {values[0]:.2f} to {values[-1]:.2f} points "
            f"(median {statistics.median(values):.2f}); a true difference below that is likely to read as a tie.")


def report_markdown(cfg_text: str, selected: dict[str, dict], command: str, header: str, png_name: str | None) -> str:
    rows = comparisons(selected)
    lines = [
        "<!-- Written by `python -m bench.fidelity`; edit the command's output, not this file. -->",
        "# Fidelity study: the conditioning variants against the paper's multi-task baseline",
        "",
        header,
        "",
        "```bash",
        command,
        "```",
        "",
        cfg_text,
        "",
        "## Test split (reported): mean ± std [95% interval] over seeds, at each variant's chosen rate",
        "",
        results_table(selected),
        "",
    ]
    if png_name:
        lines += [f"![test scores per task, 95% intervals]({png_name})", ""]
    lines += [
        "## Against the paper's ordering",
        "",
        "Welch's t-test on the per-seed test averages (seeds are not paired), Holm-adjusted over the "
        "comparisons below; agrees / disagrees = significant at 5% after adjustment, tie = not.",
        "",
        *claim_lines(rows),
        "",
        detectable_summary(rows),
        "",
        "### Every comparison",
        "",
        comparisons_table(rows),
        "",
        "### Per task, against the MTL baseline (Welch, unadjusted)",
        "",
        per_task_table(per_task_vs_baseline(selected)),
        "",
        "## Tuning: dev-split average per learning rate (mean ± std over seeds; chosen in bold)",
        "",
        tuning_table(selected),
        "",
    ]
    return "\n".join(lines)


def config_text(cfg: StudyConfig, lrs: Sequence[float], seeds: Sequence[int]) -> str:
    checkpoint = ("the last step" if cfg.eval_points == 1 else
                  f"the best of {cfg.eval_points} evaluations per task on the dev split (steps "
                  f"{', '.join(map(str, eval_steps(cfg.steps, cfg.eval_points)))}), its test score reported")
    return (f"Suite `{cfg.tasks}` ({', '.join(cfg.task_names())}); backbone `{cfg.model}` "
            f"({'pretrained' if cfg.load_weights else 'random init, trained from scratch'}), the whole model trained; "
            f"{cfg.steps} steps of {cfg.batch_size} examples, AdamW, linear warmup {cfg.warmup_fraction:g} then decay, "
            f"gradient clipping {cfg.clip_grad_norm}; prompt length {cfg.prompt_length}, bottleneck {cfg.bottleneck}. "
            f"Learning-rate grid {', '.join(f'{x:g}' for x in lrs)}, the same for every variant, chosen on the "
            f"`{cfg.dev_split}` split; seeds {', '.join(map(str, seeds))}; scores on the `{cfg.test_split}` split "
            f"(exact match %, or the task's metric), checkpoint: {checkpoint}. `trainable` counts every trained "
            "parameter, `conditioning` the variant's own; `step ms` is the median training step of one cell "
            f"({cfg.threads} CPU thread per cell on a shared machine: compare within this table only).")


def plot(selected: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(selected)
    tasks = list(selected[variants[0]]["test"][0]) + ["average"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(tasks), 4.4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        rows = selected[v]["test"]
        stats = [fs.interval([x[t] for x in rows]) for t in tasks[:-1]] + [fs.interval([average(x) for x in rows])]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [s.mean for s in stats], width, label=_label(v),
               yerr=[[s.mean - s.low for s in stats], [s.high - s.mean for s in stats]], capsize=2)
    ax.set_xticks(range(len(tasks)), [t.split("/")[-1] for t in tasks])
    ax.set_ylabel("test score (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Test score per task, mean over seeds, 95% interval")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


_NOTES_MARK = "<!-- notes: kept across runs -->"


def write_doc(doc: Path, text: str) -> None:
    """Write the report; the hand-written discussion under the notes marker survives a rerun."""
    notes = "\n" + _NOTES_MARK + "\n"
    if doc.is_file() and _NOTES_MARK in doc.read_text():
        notes = "\n" + _NOTES_MARK + doc.read_text().split(_NOTES_MARK, 1)[1]
    doc.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(doc, text + notes)


def machine_load() -> str:
    return f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[StudyConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = StudyConfig()
    for f in dataclasses.fields(StudyConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            parser.add_argument(flag, type=kind, default=getattr(defaults, f.name))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(STUDY_VARIANTS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2],
                        help="learning-rate grid, the same for every variant")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (processes)")
    parser.add_argument("--cell", type=int, default=None,
                        help="train only cell N of variants x lrs x seeds (0-based, variant-major): one array task")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached cells")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--doc", type=Path, default=Path("docs/fidelity.md"))
    parser.add_argument("--png", type=Path, default=None, help="default: fidelity.png next to --doc")
    args = parser.parse_args(argv)
    cfg = StudyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)})
    args.png = args.png or args.doc.with_name("fidelity.png")
    n = len(args.variants) * len(args.lrs) * len(args.seeds)
    if args.cell is not None and not 0 <= args.cell < n:
        parser.error(f"--cell {args.cell}: expected 0..{n - 1} "
                     f"({len(args.variants)} variants x {len(args.lrs)} rates x {len(args.seeds)} seeds)")
    if cfg.dev_split == cfg.test_split:
        parser.error(f"--dev-split and --test-split are both {cfg.dev_split!r}: the rate must be chosen on "
                     "a split that is not the reported one")
    if cfg.tasks not in SUITES and not cfg.task_names():
        parser.error(f"--tasks {cfg.tasks!r}: expected one of {sorted(SUITES)} or comma-separated task names")
    if cfg.eval_points < 1 or cfg.steps < 1:
        parser.error("--steps and --eval-points must be >= 1")
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    command = "python -m bench.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    cells = [(v, lr, s) for v in args.variants for lr in args.lrs for s in args.seeds]
    if args.cell is not None:
        cells = [cells[args.cell]]
    cached = {c for c in cells if load_cell(args.out_dir, cfg, *c) is not None}
    # Seed-major order: an interrupted study has every variant's and rate's first seeds.
    todo = [] if args.report_only else [(v, lr, s) for s in args.seeds for v in args.variants for lr in args.lrs
                                        if (v, lr, s) in cells and (v, lr, s) not in cached]
    load_start = machine_load()
    print(f"fidelity: {len(cells)} cells, {len(cached)} cached in {args.out_dir}/cells, "
          f"{len(todo)} to train ({args.jobs} at a time); {load_start}", flush=True)
    start = time.time()
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(todo)))) as pool:
            futures = [pool.submit(run_cell, cfg, v, lr, s, args.out_dir) for v, lr, s in todo]
            for done, future in enumerate(as_completed(futures), 1):
                r = future.result()
                best = best_point_scores(r)
                print(f"  [{done}/{len(todo)} {time.time() - start:6.0f}s] {r['variant']:<19} lr {r['lr']:<6g} "
                      f"seed {r['seed']}: dev {average(best['dev']):5.1f} test {average(best['test']):5.1f}  "
                      + " ".join(f"{t.split('/')[-1]} {x:.0f}" for t, x in best["test"].items())
                      + f"  ({r['step_time_ms']:.0f} ms/step)", flush=True)
    wall = time.time() - start
    if args.cell is not None:
        return 0  # the array's last job (or --report-only) writes the report
    records = [r for c in cells if (r := load_cell(args.out_dir, cfg, *c)) is not None]
    if not records:
        print("fidelity: no complete cell to report", file=sys.stderr)
        return 1
    selected = select(records)
    plot(selected, args.png)
    shown = command.replace(" --report-only", "")
    header = (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(records)} of {len(cells)} cells "
              + (f"complete; this call trained {len(todo)} cells in {wall / 60:.1f} min ({args.jobs} at a time); "
                 f"machine: {load_start} at the start, {machine_load().split(', ', 1)[1]} at the end."
                 if todo else "complete (report of cached cells)."))
    text = report_markdown(config_text(cfg, args.lrs, args.seeds), selected, shown, header, args.png.name)
    write_doc(args.doc, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
