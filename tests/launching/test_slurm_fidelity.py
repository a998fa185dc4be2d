"""slurm/fidelity.sbatch on the one-node SLURM cluster (CPU): an array of two cells, each a real
`hp-deepspeed train` run of a tiny model, then the report job, which reads both runs."""

from __future__ import annotations

import pytest

from hp_deepspeed.config import from_dict, save_config
from hp_deepspeed.training.train_config import JobConfig
from tests.launching.conftest import sbatch, wait_for_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
JOB_TIMEOUT = 600
JOB = {
    "model": {"name_or_path": "configs/models/t5-demo", "load_weights": False},
    "conditioning": {"prompt_length": 2, "bottleneck": 4},
    "data": {"tasks": ["fidelity/first", "fidelity/place"], "max_input_length": 32, "max_target_length": 8,
             "bucket_pool_batches": 2},
    "optim": {"warmup_steps": 1},
    "training": {"steps": 2, "micro_batch_size": 4, "ds_config": "ds_configs/zero3_cpu_test.json", "log_every": 1,
                 "progress_bar": False, "tensorboard": False},
    "eval": {"every": 1, "batch_size": 8, "max_examples_per_task": 8, "max_new_tokens": 3},
    "checkpoint": {"interval": 1000, "keep_last": 1},
}


def test_fidelity_sbatch_runs_each_cell_as_a_trainer_job_and_reports(slurm_cluster, tmp_path):
    config = tmp_path / "job.yaml"
    save_config(from_dict(JobConfig, JOB), config)
    out, doc = tmp_path / "study", tmp_path / "fidelity.md"
    study = ["--config", str(config), "--variants", "mtl", "hyperprompt_global", "--lrs", "1e-3", "--seeds", "0",
             "--dev-split", "validation", "--test-split", "test", "--out-dir", str(out), "--doc", str(doc)]
    env = dict(HP_DEVICE="cpu", HP_MODULE="hp_deepspeed.cli")
    array = sbatch(["--array=0-1", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%A_%a.out",
                    "slurm/fidelity.sbatch", *study], **env)
    report = sbatch([f"--dependency=afterany:{array}", "--ntasks=1", f"--output={tmp_path}/report-%j.out",
                     "slurm/fidelity.sbatch", "--report", *study], **env)
    info = wait_for_job(report, JOB_TIMEOUT, tmp_path / "*.out")
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", (info, logs)
    for variant in ("mtl", "hyperprompt_global"):
        run = out / "cells" / f"{variant}-lr0.001-seed0"
        assert (run / "checkpoints" / "step-2" / "COMPLETE").is_file(), logs  # the trainer's own checkpoint
    text = doc.read_text()
    assert "2 of 2 cells finished" in text
    assert "| MTL baseline (task prefix) | 0.001 |" in text and "| HyperPrompt-Global | 0.001 |" in text
