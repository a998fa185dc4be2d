"""Metric sinks: one JSON object per line in ``RUN_DIR/metrics.jsonl`` plus TensorBoard.

Only rank 0 writes. The JSONL file is the source of truth (``hp-deepspeed report`` plots it);
TensorBoard is a convenience and is skipped, with a warning, when it is not installed.

A training run continues from its checkpoint's step: what an earlier launch logged after that
step (the steps an interruption lost, which this launch trains again) is removed from both
sinks when the run starts, so each curve has one point per step and never goes back in time:
the JSONL records past the step are dropped (the file rewritten whole, then renamed) and
TensorBoard's events past it purged (``SummaryWriter(purge_step=...)``). The ``eval`` command
evaluates a checkpoint again: its records have kind ``eval_checkpoint`` and its TensorBoard
run is ``tensorboard/eval_checkpoint``, never a second point in the training run's curves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


EVAL_CHECKPOINT = "eval_checkpoint"
"""Record kind (and TensorBoard run) of the ``eval`` command's results."""


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, start_step: int | None = 0,
                 evaluating: bool = False):
        """``start_step``: the step training continues from (0 for a fresh run); what was logged
        past it is removed. ``evaluating``: the ``eval`` command (nothing removed, own series)."""
        self.enabled = enabled
        self.evaluating = evaluating
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if not evaluating and path.is_file():
            drop_records_after(path, start_step)
        self._jsonl = path.open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                if evaluating:
                    self._tb = SummaryWriter(str(run_dir / "tensorboard" / EVAL_CHECKPOINT))
                else:
                    self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # TensorBoard keeps the tag, so the eval command's run sits beside the training run's curve.
        record = {"kind": EVAL_CHECKPOINT if self.evaluating else kind, "step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite ``path`` without its records past ``step`` (and without a last line cut short);
    returns how many were dropped. The file is replaced whole: a crash leaves the old one."""
    keep, dropped = [], 0
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            record = json.loads(line)
            past = int(record.get("step", 0)) > step
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            past = line is lines[-1]  # the last line of a run killed mid-write; others stay as they are
        if past:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
        log.info("%s: dropped %d record(s) past step %d, which this run trains again", path, dropped, step)
    return dropped


def memory_stats() -> dict[str, float]:
    """Peak accelerator memory on GPU, resident set size on the CPU (GiB)."""
    import torch  # here: `hp-deepspeed report` reads metrics without torch

    if torch.cuda.is_available():
        return {
            "mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gib": torch.cuda.memory_reserved() / 2**30,
        }
    return {"mem_rss_gib": psutil.Process().memory_info().rss / 2**30}


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl, a later record of the same (kind, step) replacing an earlier
    one (a resumed run re-logs the steps after its checkpoint). A last line cut short by a crash
    is ignored; a malformed line anywhere else is an error."""
    latest: dict[tuple, dict] = {}
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line of a run killed mid-write
                break
            raise ValueError(f"{path}:{number}: not a JSON record") from None
        latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
