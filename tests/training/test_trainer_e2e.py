"""The trainer end to end through the real `deepspeed` launcher: exact resume after SIGKILL,
resume on a different number of ranks, preemption, export and predict.

Each run is a real multi-process ZeRO-3 job on the CPU (gloo), fp32, so equality is exact where
the computation is the same and within fp32 tolerance where the reduction order differs.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hp_deepspeed.testing.distributed import base_env, free_port, run_command
from hp_deepspeed.training.metrics_log import read_metrics

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "training" / "tiny_job.yaml"


def train_cmd(run_dir: Path, *overrides: str, ranks: int = 2) -> list[str]:
    train = ["train", "--config", str(JOB), f"run.dir={run_dir}", *overrides]
    if ranks == 1:  # a plain process: world size 1 without any launcher
        return [sys.executable, "-m", "hp_deepspeed.cli", *train]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", "hp_deepspeed.cli", *train]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of 8 steps (checkpoints every 2)."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_command(train_cmd(run_dir), timeout=420, cwd=REPO)
    return run_dir


@pytest.fixture(scope="module")
def reference_run_without_dropout(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference-no-dropout")
    run_command(train_cmd(run_dir, "model.dropout_rate=0.0", "checkpoint.keep_last=4"), timeout=420, cwd=REPO)
    return run_dir


def test_reference_run_learns_and_leaves_checkpoints(reference_run):
    steps = losses(reference_run)
    assert sorted(steps) == list(range(1, 9))
    assert steps[8] < steps[1]
    checkpoints = reference_run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-8"
    assert (checkpoints / "step-8" / "COMPLETE").is_file()
    evals = [r for r in read_metrics(reference_run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and "glue/rte/accuracy" in evals[-1] and "synthetic/first/accuracy" in evals[-1]


def test_sigkill_at_a_random_step_then_resume_gives_identical_losses(reference_run, tmp_path):
    kill_after = random.Random(os.environ.get("PYTEST_SEED", 0)).randint(3, 6)
    proc = subprocess.Popen(train_cmd(tmp_path), cwd=REPO, env=base_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = tmp_path / "metrics.jsonl"
            if metrics.is_file() and max(losses(tmp_path), default=0) >= kill_after:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(losses(tmp_path)) >= kill_after, "the run died before the kill"
    assert max(losses(tmp_path)) < 8, "the run finished before the kill"

    run_command(train_cmd(tmp_path, ranks=2) + ["--resume", "auto"], timeout=420, cwd=REPO)
    assert losses(tmp_path) == losses(reference_run)  # bit-identical, every step


def test_two_rank_checkpoint_resumes_on_one_rank(reference_run_without_dropout, tmp_path):
    reference_run = reference_run_without_dropout
    step4 = reference_run / "checkpoints" / "step-4"
    start = 4
    # One rank with twice the micro-batch: the same global batch, hence the same data stream and
    # (with the world-size-invariant loss) the same objective. Dropout is off for this comparison:
    # its masks come from per-rank generators, so they legitimately differ between 2 ranks and 1.
    run_command(train_cmd(tmp_path, "training.micro_batch_size=8", "model.dropout_rate=0.0", ranks=1)
                + ["--resume", str(step4)], timeout=420, cwd=REPO)
    resumed, reference = losses(tmp_path), losses(reference_run)
    assert sorted(resumed) == list(range(start + 1, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=2e-5), step
    assert (step4 / "universal").is_dir()  # converted automatically for the new world size


def test_export_then_predict_without_deepspeed(reference_run, tmp_path):
    out = tmp_path / "export"
    run_command([sys.executable, "-m", "hp_deepspeed.cli", "export", "--run-dir", str(reference_run),
                 "--out", str(out)], timeout=300, cwd=REPO)
    manifest = json.loads((out / "export.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["synthetic/first", "glue/rte"]
    # The backbone is a Hugging Face checkpoint: transformers loads it and agrees with ours.
    import torch
    from transformers import T5ForConditionalGeneration

    from hp_deepspeed.export import load_export

    ours, _, _ = load_export(out, torch.device("cpu"))
    theirs = T5ForConditionalGeneration.from_pretrained(out / "backbone").eval()
    ids = torch.tensor([[5, 9, 13, 1]])
    labels = torch.tensor([[7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours.backbone(ids, labels=labels).logits,
                                   theirs(input_ids=ids, labels=labels).logits, rtol=1e-5, atol=1e-5)
    rows = REPO / "hp_deepspeed" / "bundled" / "data" / "glue" / "rte" / "validation.jsonl"
    result = run_command([sys.executable, "-m", "hp_deepspeed.cli", "predict", "--export", str(out),
                          "--task", "glue/rte", "--input", str(rows)], timeout=300, cwd=REPO)
    predictions = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(predictions) == sum(1 for line in rows.read_text().splitlines() if line.strip())
    assert {p["text"] for p in predictions} <= {"entailment", "not_entailment"}


def test_eval_command_scores_the_newest_checkpoint(reference_run):
    cmd = train_cmd(reference_run)
    cmd[cmd.index("train")] = "eval"
    result = run_command(cmd + ["--checkpoint", "auto"], timeout=420, cwd=REPO)
    assert "evaluation at step 8" in result.output and "glue/rte" in result.output
