"""Corrupt checkpoints through the real command line: a resume skips a checkpoint whose files do
not match its manifest, with one warning naming the file and the step used instead, and refuses
with one error line (exit 2, no traceback) when none verifies; ``latest`` holding binary junk is
the same as no ``latest``.

One 1-rank ``train`` writes step-2 and step-4; each case corrupts a copy and resumes it with
``training.steps`` at or below the step resumed, so the trainer loads and stops without training.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hp_deepspeed.testing.ranks import base_env, run_command

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "training" / "tiny_job.yaml"


def train(run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hp_deepspeed.cli", "train", "--config", str(JOB), f"run.dir={run_dir}",
         f"training.steps={steps}", "checkpoint.keep_last=3", "eval.every=0"],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=420)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("saved")
    run_command([sys.executable, "-m", "hp_deepspeed.cli", "train", "--config", str(JOB), f"run.dir={run_dir}",
                 "training.steps=4", "checkpoint.keep_last=3"], timeout=420, cwd=REPO)
    return run_dir


def copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line or " ERROR " in line or "error:" in line]


def test_a_truncated_optimizer_shard_and_junk_in_latest_resume_the_previous_step(saved, tmp_path):
    run_dir = copy(saved, tmp_path)
    root = run_dir / "checkpoints"
    shard = root / "step-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 3])
    (root / "latest").write_bytes(b"\xff\xfe\x00\x9c binary junk")
    result = train(run_dir, steps=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = problems(result.stderr)
    assert line.endswith(f"WARNING hp_deepspeed.checkpointing.manager: checkpoint step-4 fails verification "
                         f"({shard}: {size // 3} bytes, the manifest says {size}); resuming from step-2 instead")
    assert re.search(rf"resumed from {re.escape(str(root.resolve()))}/step-2 at step 2", result.stderr)
    assert shard.stat().st_size == size // 3  # the evidence stays where it was


def test_when_no_step_verifies_the_resume_is_one_error_line(saved, tmp_path):
    run_dir = copy(saved, tmp_path)
    root = run_dir / "checkpoints"
    states = root / "step-4" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states.write_bytes(bytes(states.stat().st_size))  # zero-filled, same size
    state = root / "step-2" / "trainer_state.json"
    text = state.read_text()
    state.write_text(text[: len(text) // 2])  # cut mid-file
    result = train(run_dir, steps=4)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = problems(result.stderr)
    assert line == (
        f"hp-deepspeed train: error: {root}: no checkpoint passes verification: step-4: {states}: content "
        f"differs from the manifest (xxh3_128); step-2: {state}: {len(text) // 2} bytes, the manifest says {len(text)}")
    assert "ZeRO stage" not in result.stderr  # refused before the DeepSpeed config and the model
