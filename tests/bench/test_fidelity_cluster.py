"""bench.fidelity_cluster, the cluster version of the fidelity study: a cell is an `hp-deepspeed
train` run given by overrides; the report reads the runs' metrics.jsonl (no SLURM here: the
sbatch runs in tests/launching/test_slurm_fidelity.py)."""

import json

import pytest

from bench import fidelity_cluster as fc
from hp_deepspeed.config import from_dict, load_config, save_config
from hp_deepspeed.training.train_config import JobConfig

JOB = {
    "model": {"name_or_path": "configs/models/t5-demo", "load_weights": False},
    "conditioning": {"prompt_length": 4, "bottleneck": 8},
    "data": {"tasks": ["fidelity/first", "fidelity/place"]},
}
STUDY = ["--variants", "mtl", "hyperprompt_global", "--lrs", "1e-3", "3e-3", "--seeds", "0", "1",
         "--dev-split", "validation", "--test-split", "test"]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "job.yaml"
    save_config(from_dict(JobConfig, JOB), path)
    return path


def test_a_cell_is_a_trainer_run_whose_overrides_the_config_accepts(config, tmp_path):
    args = fc.parse_args(["cell", "--config", str(config), "--index", "5", "--out-dir", str(tmp_path / "o")] + STUDY)
    overrides = fc.cell_overrides(args, 5)  # variant-major: hyperprompt_global, lr 1e-3, seed 1
    job = load_config(JobConfig, [config], overrides)
    assert (job.conditioning.variant, job.optim.lr, job.run.seed) == ("hyperprompt_global", 1e-3, 1)
    assert job.data.eval_splits == {"fidelity/first": ["validation", "test"], "fidelity/place": ["validation", "test"]}
    assert job.run.dir == str(tmp_path / "o" / "cells" / "hyperprompt_global-lr0.001-seed1")
    mtl = load_config(JobConfig, [config], fc.cell_overrides(args, 0))
    assert mtl.conditioning.variant == "mtl" and mtl.data.task_prefix


def fake_run(run_dir, variant, lr, seed, dev, test, config):
    """A finished cell: the resolved config and two evaluations (the first one best on dev)."""
    run_dir.mkdir(parents=True)
    job = load_config(JobConfig, [config], [f"conditioning.variant={variant}", f"optim.lr={lr}"])
    save_config(job, run_dir / "config.yaml")
    lines = [{"kind": "train", "step": s, "time": 10.0 * s, "loss": 1.0} for s in (1, 2, 3, 4)]
    for step, d, t in ((2, dev, test), (4, dev - 10, test + 50)):
        scores = {}
        for task in ("fidelity/first", "fidelity/place"):
            scores[f"{task}_validation/score"], scores[f"{task}_test/score"] = d, t
        lines.insert(step, {"kind": "eval", "step": step, "time": 10.0 * step + 1, **scores})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_report_reads_every_run_and_picks_rate_and_checkpoint_on_dev(config, tmp_path, capsys):
    out, doc = tmp_path / "o", tmp_path / "doc.md"
    args = ["report", "--config", str(config), "--out-dir", str(out), "--doc", str(doc)] + STUDY
    assert fc.main(args) == 1 and "no finished cell" in capsys.readouterr().err
    for variant, base in (("mtl", 60.0), ("hyperprompt_global", 80.0)):
        for lr, shift in ((1e-3, 0.0), (3e-3, 5.0)):
            for seed in (0, 1):
                fake_run(fc.cell_dir(out, variant, lr, seed), variant, lr, seed, dev=base + shift + seed,
                         test=base - shift + seed, config=config)
    assert fc.main(args) == 0
    text = doc.read_text()
    # lr 3e-3 is better on dev; the test score is taken at step 2 (best dev), not step 4 (best test)
    assert "| MTL baseline (task prefix) | 0.003 | 55.5 ± 0.7" in text
    assert "| HyperPrompt-Global | 0.003 | 75.5 ± 0.7" in text
    assert "HyperPrompt-Global > MTL baseline (task prefix): **agrees**" in text
    record = fc.cell_record(fc.cell_dir(out, "mtl", 1e-3, 0), "mtl", 1e-3, 0, ["fidelity/first", "fidelity/place"],
                            "validation", "test")
    assert record["step_time_ms"] == pytest.approx(10_000.0) and record["conditioning_params"] == 0


def test_the_dev_split_must_not_be_the_reported_one(config, capsys):
    with pytest.raises(SystemExit):
        fc.parse_args(["cells", "--config", str(config), "--dev-split", "validation", "--test-split", "validation"])
    assert "not the reported one" in capsys.readouterr().err
