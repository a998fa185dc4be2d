"""The real trainer through the real slurm/train.sbatch on a one-node SLURM cluster (CPU, 2 tasks):
preempted by the signal the batch shell gets before the time limit, requeued, and finished from
its checkpoint with a continuous step count."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from hp_deepspeed.training.metrics_log import read_metrics
from tests.launching.conftest import REPO, sbatch, wait_for_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
JOB = REPO / "tests" / "training" / "tiny_job.yaml"
JOB_TIMEOUT = 600


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in read_metrics(path) if r["kind"] == "train"]


def test_trainer_sbatch_preempted_requeued_resumed_and_evaluated(slurm_cluster, tmp_path):
    run_dir, steps = tmp_path / "run", 30
    job = sbatch(["--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                  "--config", str(JOB), f"training.steps={steps}", "checkpoint.interval=1000"],
                 HP_DEVICE="cpu", HP_RUN_DIR=str(run_dir), HP_MODULE="hp_deepspeed.cli")
    log = tmp_path / f"hp-train-{job}.out"
    deadline = time.monotonic() + JOB_TIMEOUT
    while max(train_steps(run_dir), default=0) < 3:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} logged fewer than 3 steps: {log.read_text()[-4000:] if log.exists() else ''}")
        time.sleep(0.5)
    # What --signal=B:USR1@T does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_for_job(job, 2 * JOB_TIMEOUT, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-6000:])
    assert "training step exited with 75" in text and f"scontrol requeue {job}" in text

    # The preemption checkpoint was written, then resumed from by the requeued job.
    preempted_at = int(text.split("checkpoint of step ")[1].split()[0])
    assert 3 <= preempted_at < steps
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{preempted_at}'} at step {preempted_at}" in text
    # Continuous: every step logged, none missing, and the run ended where it should.
    assert sorted(set(train_steps(run_dir))) == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{steps}"
    assert (run_dir / "checkpoints" / f"step-{steps}" / "COMPLETE").is_file()
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["step"] == steps and "glue/rte/accuracy" in evals[-1]
