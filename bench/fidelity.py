"""The paper's comparison in miniature: every conditioning variant on one multi-task suite.

    python -m bench.fidelity                                   # bundled suite, every variant, 3 seeds
    python -m bench.fidelity --variants none hyperprompt_global --seeds 0 --steps 50   # a quick look
    python -m bench.fidelity --model t5-base --load-weights --tasks glue --hub --device cuda   # real GLUE
    python -m bench.fidelity --cell 7 ...                      # one (variant, seed) cell (sbatch array)
    python -m bench.fidelity --report-only ...                 # table and plot from the cached cells

Each (variant, seed) cell trains the same backbone with one conditioning variant on the same
task mixture, with the same budget (steps, batch, learning rate), in one process without
DeepSpeed (one GPU or CPU threads per cell: the models compared here fit one device), then
scores every task's validation split with the project's evaluator (exact match for the
generation tasks, the task's metric for GLUE/SuperGLUE). A cell's result is a JSON file under
``OUT/cells/``, written atomically and keyed by the settings, so an interrupted study continues
where it stopped and a changed setting is never mixed with stale cells. The report (a markdown
table with mean and spread over seeds, trainable parameters and step time, and a PNG) is
written from whatever cells are complete.

The bundled suite (``--tasks synthetic``) is built to make the variants differ:

* tasks that share their inputs: ``first``, ``last`` and ``copy`` of the same word sequences,
  with no task text in the input, so only the conditioning tells them apart;
* a task that shares structure with another: ``reverse`` (the outputs of ``copy``, reordered);
* a low-resource task: ``reverse`` is trained on ``--low-resource`` examples only (default 128
  of the 1000 bundled), so it must borrow from the tasks it shares structure with.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence, get_args

from hp_deepspeed.data.config import BUNDLED_DATA_DIR, CustomTaskConfig, DataConfig
from hp_deepspeed.model.conditioning import Variant

VARIANTS = tuple(get_args(Variant))
SUITES = {
    # shares inputs: first / last / copy; shares structure with copy and low-resource: reverse
    "synthetic": ["synthetic/first", "synthetic/last", "synthetic/copy"],
    "glue": ["glue/cola", "glue/sst2", "glue/mrpc", "glue/qqp", "glue/stsb", "glue/mnli", "glue/qnli", "glue/rte"],
    "superglue": ["superglue/boolq", "superglue/cb", "superglue/copa", "superglue/multirc", "superglue/record",
                  "superglue/rte", "superglue/wic", "superglue/wsc"],
}
LOW_RESOURCE_TASK = "fidelity/reverse_low"
# The paper's ordering (He et al. 2022, Tables 1-2), checked against the measured averages.
PAPER_ORDER = [
    ("hyperprompt_global", ">=", "hyperprompt_share"),
    ("hyperprompt_share", ">=", "hyperprompt_sep"),
    ("hyperprompt_sep", ">", "none"),
    ("hyperprompt_sep", ">", "prompt_tuning"),
    ("hyperprompt_global", ">", "hyperformer"),
]


@dataclasses.dataclass
class StudyConfig:
    """One fidelity study: the suite, the backbone and the budget every cell gets."""

    model: str = "configs/models/t5-demo"
    """Preset, local folder or hub id of the backbone (``t5-base`` on a GPU cluster)."""
    load_weights: bool = False
    """Load pretrained weights (a random backbone otherwise, as for the bundled suite)."""
    tasks: str = "synthetic"
    """A suite name (``synthetic``, ``glue``, ``superglue``) or comma-separated task names."""
    data_dir: str | None = None
    """Folder of the registry tasks' files; ``None`` means the bundled files."""
    hub: bool = False
    """Download registry tasks missing under ``data_dir`` from the hub."""
    tokenizer: str | None = None
    """Tokenizer folder; ``None`` means the bundled one (use the checkpoint's for ``t5-base``)."""
    low_resource: int = 128
    """Training examples of the low-resource task of the bundled suite."""
    steps: int = 600
    """Optimizer steps per cell."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup over 5% of the steps, then linear decay)."""
    clip_grad_norm: float = 1.0
    """Global gradient-norm clipping, the trainer's default (``optim.clip_grad_norm``): without it
    a hypernetwork, whose generated weights are products of parameters, can diverge at this lr."""
    max_input_length: int = 64
    max_target_length: int = 16
    prompt_length: int = 4
    bottleneck: int = 16
    eval_batch_size: int = 100
    max_eval_examples: int = 0
    """Examples scored per task (0: the whole validation split)."""
    max_new_tokens: int = 12
    threads: int = 1
    """Torch threads per cell (cells run ``--jobs`` at a time)."""
    device: str = "cpu"

    def key(self) -> str:
        """Fingerprint of everything that changes a cell's result (device and threads excluded)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("threads", "device")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------


def data_config(cfg: StudyConfig, out_dir: Path, seed: int) -> DataConfig:
    """The suite as a DataConfig; the bundled suite's low-resource task is written under OUT."""
    custom = []
    if cfg.tasks in SUITES:
        names = list(SUITES[cfg.tasks])
    else:
        names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if cfg.tasks == "synthetic":
        custom.append(_low_resource_task(out_dir / "suite", cfg.low_resource))
    return DataConfig(
        tasks=names, custom_tasks=custom, data_dir=cfg.data_dir, hub=cfg.hub, tokenizer=cfg.tokenizer,
        max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length,
        mixture="temperature", temperature=2.0, seed=seed, cache_dir=str(out_dir / "cache"),
    )


def _low_resource_task(folder: Path, examples: int) -> CustomTaskConfig:
    source = BUNDLED_DATA_DIR / "synthetic" / "reverse"
    folder = folder / "reverse_low"
    folder.mkdir(parents=True, exist_ok=True)
    rows = (source / "train.jsonl").read_text().splitlines(keepends=True)[:examples]
    _write_atomic(folder / "train.jsonl", "".join(rows))
    _write_atomic(folder / "validation.jsonl", (source / "validation.jsonl").read_text())
    return CustomTaskConfig(name=LOW_RESOURCE_TASK, input_template="{inputs}", path=str(folder),
                            target_field="targets", metrics=["accuracy"])


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# One cell
# ------------------------------------------------------------------------------------------------


def run_cell(cfg: StudyConfig, variant: str, seed: int, out_dir: Path) -> dict:
    """Train and score one (variant, seed); returns the cell's record (also written as JSON)."""
    import torch

    from hp_deepspeed.data.stream import TrainStream
    from hp_deepspeed.data.tasks import build_tasks
    from hp_deepspeed.data.tokenization import load_tokenizer
    from hp_deepspeed.model.builder import ModelConfig
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.evaluation import Evaluator
    from hp_deepspeed.training.train_config import EvalConfig

    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    data_cfg = data_config(cfg, out_dir, seed)
    tasks = build_tasks(data_cfg)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(name_or_path=cfg.model, load_weights=cfg.load_weights, seed=seed, dropout_rate=0.0),
        ConditioningConfig(variant=variant, prompt_length=cfg.prompt_length, bottleneck=cfg.bottleneck),
        num_tasks=len(tasks),
    ).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    conditioning = 0 if model.conditioning is None else sum(p.numel() for p in model.conditioning.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))))
    stream = TrainStream(data_cfg, tasks, tokenizer, cfg.batch_size)
    step_times = []
    model.train()
    for _ in range(cfg.steps):
        batch = {k: v.to(device) for k, v in next(stream).items()}
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
    model.eval()
    eval_cfg = EvalConfig(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                          max_examples_per_task=cfg.max_eval_examples)
    scores = Evaluator(eval_cfg, data_cfg, tasks, tokenizer, rank=0, world_size=1).evaluate(model, cfg.steps)
    record = {
        "key": cfg.key(), "variant": variant, "seed": seed,
        "scores": Evaluator.primary_scores(scores),
        "trainable_params": sum(p.numel() for p in trainable),
        "conditioning_params": conditioning,
        # the median skips the first steps' allocator warm-up and the load of a shared machine's spikes
        "step_time_ms": 1000 * statistics.median(step_times[min(10, len(step_times) - 1):]),
        "final_loss": float(loss.detach()),
        "device": str(device), "threads": cfg.threads,
    }
    _write_atomic(cell_path(out_dir, cfg, variant, seed), json.dumps(record, indent=2) + "\n")
    return record


def cell_path(out_dir: Path, cfg: StudyConfig, variant: str, seed: int) -> Path:
    return out_dir / "cells" / f"{variant}-seed{seed}-{cfg.key()}.json"


def load_cell(out_dir: Path, cfg: StudyConfig, variant: str, seed: int) -> dict | None:
    path = cell_path(out_dir, cfg, variant, seed)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == cfg.key() else None


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def summarise(records: Sequence[dict]) -> dict[str, dict]:
    """Per variant: per-task and average mean/std over seeds, params, median step time."""
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    summary = {}
    for variant, rows in by_variant.items():
        tasks = sorted(rows[0]["scores"])
        per_task = {t: [r["scores"][t] for r in rows] for t in tasks}
        averages = [statistics.fmean(r["scores"].values()) for r in rows]
        summary[variant] = {
            "seeds": sorted(r["seed"] for r in rows),
            "tasks": {t: _mean_std(v) for t, v in per_task.items()},
            "average": _mean_std(averages),
            "trainable_params": rows[0]["trainable_params"],
            "conditioning_params": rows[0]["conditioning_params"],
            "step_time_ms": statistics.median(r["step_time_ms"] for r in rows),
        }
    return summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ordering_checks(summary: dict[str, dict]) -> list[tuple[str, bool]]:
    """The paper's ordering on the averages: (claim, holds here) for each pair measured."""
    out = []
    for a, op, b in PAPER_ORDER:
        if a in summary and b in summary:
            x, y = summary[a]["average"][0], summary[b]["average"][0]
            out.append((f"{a} {op} {b} ({x:.1f} vs {y:.1f})", x >= y if op == ">=" else x > y))
    return out


def format_table(summary: dict[str, dict]) -> str:
    variants = [v for v in VARIANTS if v in summary]
    tasks = list(next(iter(summary.values()))["tasks"]) if summary else []
    head = "| variant | " + " | ".join(tasks) + " | average | trainable | conditioning | step ms |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 4)]
    for v in variants:
        s = summary[v]
        cells = [f"{m:.1f} ± {d:.1f}" for m, d in (s["tasks"][t] for t in tasks)]
        avg = s["average"]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | **{avg[0]:.1f} ± {avg[1]:.1f}** | "
                     f"{s['trainable_params']:,} | {s['conditioning_params']:,} | {s['step_time_ms']:.0f} |")
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if v in summary]
    tasks = list(summary[variants[0]]["tasks"]) + ["average"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(tasks), 4.2))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        stats = [summary[v]["tasks"][t] for t in tasks[:-1]] + [summary[v]["average"]]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[d for _, d in stats], label=v, capsize=2)
    ax.set_xticks(range(len(tasks)), [t.split("/")[-1] for t in tasks])
    ax.set_ylabel("exact match / task metric (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Conditioning variants, mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: StudyConfig, summary: dict[str, dict], command: str, doc: Path, png: Path, wall_s: float,
                 complete: str) -> str:
    checks = ordering_checks(summary)
    seeds = ", ".join(f"{v} {s['seeds']}" for v, s in summary.items())
    machine = f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
    text = "\n".join([
        "<!-- Written by `python -m bench.fidelity`; edit the command's output, not this file. -->",
        "# Fidelity study: the conditioning variants side by side",
        "",
        "Command (" + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", {machine}, "
        + (f"wall time {wall_s / 60:.1f} min for the cells run by this call" if wall_s else "report of cached cells")
        + f"; {complete}):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Suite `{cfg.tasks}`, backbone `{cfg.model}` ({'pretrained' if cfg.load_weights else 'random init'}), "
        f"{cfg.steps} steps of {cfg.batch_size} examples, AdamW lr {cfg.lr}, prompt length {cfg.prompt_length}, "
        f"bottleneck {cfg.bottleneck}, gradient clipping {cfg.clip_grad_norm}, the whole model trained; seeds per "
        f"variant: {seeds}. "
        "Scores are exact match (%) on each task's validation split, mean ± std over seeds; "
        "`trainable` counts every trained parameter, `conditioning` the variant's own; `step ms` is the "
        "median training step time of one cell (one CPU thread per cell, cells run two at a time on a "
        "shared machine: compare step times within this table only).",
        "",
        format_table(summary),
        "",
        f"![per-task exact match]({png.name})",
        "",
        "## Against the paper's ordering",
        "",
        "The paper (He et al. 2022, Tables 1-2, T5-Base to XXL on GLUE/SuperGLUE): HyperPrompt-Global "
        ">= Share >= Sep > the multi-task model and Prompt-Tuning; HyperFormer++ below HyperPrompt.",
        "",
        *[f"- {'agrees' if ok else '**differs**'}: {claim}" for claim, ok in checks],
        "",
    ])
    doc.parent.mkdir(parents=True, exist_ok=True)
    notes = _kept_notes(doc)
    doc.write_text(text + notes)
    return text


_NOTES_MARK = "<!-- notes: kept across runs -->"


def _kept_notes(doc: Path) -> str:
    """The hand-written discussion under the notes marker survives a rerun of the command."""
    if doc.is_file() and _NOTES_MARK in doc.read_text():
        return "\n" + _NOTES_MARK + doc.read_text().split(_NOTES_MARK, 1)[1]
    return "\n" + _NOTES_MARK + "\n"


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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (processes)")
    parser.add_argument("--cell", type=int, default=None,
                        help="train only cell N of variants x seeds (0-based, variant-major): one sbatch array task")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached cells")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--doc", type=Path, default=Path("docs/fidelity.md"))
    parser.add_argument("--png", type=Path, default=None, help="default: fidelity.png next to --doc")
    args = parser.parse_args(argv)
    cfg = StudyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)})
    args.png = args.png or args.doc.with_name("fidelity.png")
    if args.cell is not None and not 0 <= args.cell < len(args.variants) * len(args.seeds):
        parser.error(f"--cell {args.cell}: expected 0..{len(args.variants) * len(args.seeds) - 1} "
                     f"({len(args.variants)} variants x {len(args.seeds)} seeds)")
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    command = "python -m bench.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    cells = [(v, s) for v in args.variants for s in args.seeds]
    if args.cell is not None:
        cells = [cells[args.cell]]
    cached = {(v, s) for v, s in cells if load_cell(args.out_dir, cfg, v, s) is not None}
    # Seed-major order, so an interrupted study has every variant's first seeds.
    todo = [] if args.report_only else [(v, s) for s in args.seeds for v in args.variants
                                        if (v, s) in cells and (v, s) not in cached]
    print(f"fidelity: {len(cells)} cells, {len(cached)} cached in {args.out_dir}/cells, "
          f"{len(todo)} to train ({args.jobs} at a time)", flush=True)
    start = time.time()
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(todo) or 1))) as pool:
        futures = {pool.submit(run_cell, cfg, v, s, args.out_dir): (v, s) for v, s in todo}
        for future in futures:
            r = future.result()
            avg = statistics.fmean(r["scores"].values())
            print(f"  {r['variant']:<20} seed {r['seed']}: average {avg:5.1f}  "
                  + "  ".join(f"{t.split('/')[-1]} {x:.0f}" for t, x in r["scores"].items())
                  + f"  ({r['step_time_ms']:.0f} ms/step)", flush=True)
    if args.cell is not None:
        return 0  # the array's last job (or --report-only) writes the report
    records = [r for v, s in cells if (r := load_cell(args.out_dir, cfg, v, s)) is not None]
    if not records:
        print("fidelity: no complete cell to report", file=sys.stderr)
        return 1
    summary = summarise(records)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.png)
    complete = f"{len(records)} of {len(cells)} cells complete"
    shown = command.replace(" --report-only", "")
    wall = 0.0 if args.report_only else time.time() - start
    print(write_report(cfg, summary, shown, args.doc, args.png, wall, complete))
    return 0


if __name__ == "__main__":
    sys.exit(main())
