"""Metric sinks: one JSON object per line in ``RUN_DIR/metrics.jsonl`` plus TensorBoard.

Only rank 0 writes. The JSONL file is the source of truth (``hp-deepspeed report`` plots it);
TensorBoard is a convenience and is skipped, with a warning, when it is not installed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file; readers keep the last value per step.
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
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


def memory_stats() -> dict[str, float]:
    """Peak accelerator memory on GPU, resident set size on the CPU (GiB)."""
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
