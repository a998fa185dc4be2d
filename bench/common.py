"""Shared pieces of the benchmarks: machine description, timing, the matmul peak, output.

Every benchmark is a script (``python -m bench.<name>``) that prints a table and writes one
JSON file. Comparisons run both sides in the same process, interleaved (A B A B ..., the order
rotated every round so neither side always runs first), and report medians and their ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers were measured on (recorded in every JSON file)."""
    load = os.getloadavg()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time every callable ``rounds`` times, interleaved (round r starts at the r-th name).

    ``warmup`` untimed calls of each first (first-step allocations, optimizer state creation).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(steps[name]))
    return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per name: ratio of medians, ratio of minimums, and the median of per-round paired ratios
    (each round's time over the base's time in the same round: robust to load drifting between
    rounds on a shared machine)."""
    out = {}
    for name, ts in times.items():
        paired = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"ratio_median": median(ts) / median(times[base]), "ratio_min": min(ts) / min(times[base]),
                     "ratio_paired_median": median(paired)}
    return out


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 ``torch.matmul`` rate (GFLOP/s) of an n x n x n product on this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = min(timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2.0 * n**3 / best / 1e9


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c)
                                             for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(name_or_path: str | Path, result: dict) -> Path:
    """Write ``result`` (plus the machine description) to bench/results/<name>.json or a path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = RESULTS / f"{name_or_path}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def cpu_zero3_engine(preset: str, num_tasks: int):
    """(engine, T5 config): a random-init HyperPrompt-Global T5 of ``preset`` under ZeRO-3 on
    gloo ranks, the model the checkpoint benchmarks save and load. Call it in every rank."""
    import deepspeed
    import torch.distributed as dist

    from hp_deepspeed.model.builder import ModelConfig, resolve_t5_config
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
    from hp_deepspeed.training.optim import OptimConfig

    deepspeed.init_distributed(dist_backend="gloo")
    model_cfg = ModelConfig(name_or_path=preset, load_weights=False)
    t5_config = resolve_t5_config(model_cfg)
    ds_config = build_ds_config(
        read_ds_config(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu_test.json"),
        micro_batch_size=1, gradient_accumulation=1, world_size=dist.get_world_size(), optim=OptimConfig(),
        d_model=t5_config.d_model, log_every=1000, on_cpu=True)
    model = build_model(model_cfg, ConditioningConfig(variant="hyperprompt_global"), num_tasks, ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    return engine, t5_config
