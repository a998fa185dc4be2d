"""slurm/*.sbatch end to end on a one-node SLURM cluster started by scripts/slurm_local_cluster.sh.

CPU mode (HP_DEVICE=cpu: no GPUs requested, gloo), 2 tasks on the one node. The jobs run the
launch workload (tests/scripts/launch_workload.py), which follows the trainer's contract: it
checkpoints and exits 75 on SIGUSR1 and resumes with --resume auto.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.launching.conftest import sbatch, wait_for_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
JOB_TIMEOUT = 420  # the CPU is shared; a 2-rank ZeRO-3 start-up can take a minute


def read_ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]


def steps_of(run_dir: Path, rank: int) -> list[int]:
    return [int(s) for s in (run_dir / f"steps-rank{rank}.txt").read_text().split()]


def wait_for_steps(run_dir: Path, job_id: str, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "steps-rank0.txt"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().split()) >= at_least:
            return
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} ran fewer than {at_least} steps in {timeout:.0f}s")


def test_train_sbatch_one_deepspeed_per_node_preempted_with_full(slurm_cluster, tmp_path):
    """HP_LAUNCH_MODE=node: one deepspeed launcher per node. `scancel --full` signals the batch
    shell (trap) and every process of the step: the launcher ignores USR1, the ranks save and
    exit 75, the launcher passes 75 on, the job is requeued and resumes."""
    run_dir, steps = tmp_path / "run", 12
    job = sbatch(["--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
                  "slurm/train.sbatch", f"train.steps={steps}", "train.step_sleep=0.5"],
                 HP_DEVICE="cpu", HP_RUN_DIR=str(run_dir), HP_LAUNCH_MODE="node",
                 HP_NODE_LAUNCHER="deepspeed")
    log = tmp_path / f"hp-train-{job}.out"
    wait_for_steps(run_dir, job, at_least=2, timeout=JOB_TIMEOUT)
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=30)
    info = wait_for_job(job, 2 * JOB_TIMEOUT, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-4000:])
    assert "caught SIGUSR1" in text and "training step exited with 75" in text
    ranks = read_ranks(run_dir)
    assert [(r["rank"], r["source"], r["restart_count"], r["end_step"]) for r in ranks] == [
        (0, "deepspeed", 1, steps), (1, "deepspeed", 1, steps)], text[-4000:]
    for r in ranks:
        assert steps_of(run_dir, r["rank"]) == list(range(steps))


def test_eval_sbatch_one_torchrun_per_node(slurm_cluster, tmp_path):
    """eval.sbatch, in HP_LAUNCH_MODE=node with torchrun: srun starts one torchrun per node,
    which starts the 2 ranks; they evaluate the run's checkpoint."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "state.json").write_text(json.dumps({"step": 5}))
    job = sbatch(["--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out", "slurm/eval.sbatch",
                  "--checkpoint", "auto"], HP_DEVICE="cpu", HP_RUN_DIR=str(run_dir),
                 HP_LAUNCH_MODE="node", HP_NODE_LAUNCHER="torchrun")
    log = tmp_path / f"hp-eval-{job}.out"
    info = wait_for_job(job, JOB_TIMEOUT, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text[-4000:])
    assert "srun --nodes=1 --ntasks-per-node=1" in text and "exec torchrun" in text
    evals = [json.loads(p.read_text()) for p in sorted(run_dir.glob("eval-rank*.json"))]
    assert [(e["rank"], e["source"], e["world_size"], e["checkpoint_step"], e["summed"])
            for e in evals] == [(0, "torchrun", 2, 5, 10.0), (1, "torchrun", 2, 5, 10.0)]
    # The master came from the allocation (the batch script), not torchrun's default.
    assert evals[0]["master_port"] == 15000 + int(job) % 20000


def test_sweep_array_maps_task_ids_to_variants(slurm_cluster, tmp_path):
    sweep = tmp_path / "variants.txt"
    sweep.write_text("# name overrides\nshort train.steps=2\n\nlong train.steps=3 train.step_sleep=0\n")
    job = sbatch(["--array=0-1", "--ntasks=1", f"--output={tmp_path}/%x-%A_%a.out",
                  "slurm/sweep.sbatch"], HP_DEVICE="cpu", HP_SWEEP_FILE=str(sweep),
                 HP_SWEEP_DIR=str(tmp_path / "runs"))
    for task, (name, steps) in enumerate([("short", 2), ("long", 3)]):
        log = tmp_path / f"hp-sweep-{job}_{task}.out"
        info = wait_for_job(f"{job}_{task}", JOB_TIMEOUT, log)
        assert info["JobState"] == "COMPLETED", (info, log.read_text()[-4000:] if log.exists() else "")
        assert f"array task {task}: variant {name}" in log.read_text()
        (rank,) = read_ranks(tmp_path / "runs" / name)
        assert (rank["world_size"], rank["end_step"], rank["source"]) == (1, steps, "slurm")


def test_train_sbatch_refuses_unknown_rank_count(slurm_cluster, tmp_path):
    """Without GPUs and without HP_DEVICE=cpu the script cannot tell ranks per node: it says so."""
    job = sbatch(["--ntasks=1", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch"],
                 HP_RUN_DIR=str(tmp_path / "run"))
    log = tmp_path / f"hp-train-{job}.out"
    info = wait_for_job(job, JOB_TIMEOUT, log)
    assert info["JobState"] == "FAILED"
    assert "cannot tell ranks per node" in log.read_text()
