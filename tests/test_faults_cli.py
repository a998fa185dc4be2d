"""Faults that used to lose work or mislead, through the real command line: non-finite numbers,
two trainers on one run dir, a read-only or full disk, exports that must be written whole.

Each case checks what a user sees and what is left on disk: the exit code, exactly one error
line naming the key or path, no traceback, the last good checkpoint still ``latest``, and no
partial output. Trainer runs are the tiny job of tests/training/tiny_job.yaml in one plain
process (world size 1, ZeRO-3 or stage 0 on the CPU); the runs a module needs start together.

Read-only and full file systems are small tmpfs mounts, which need root (as in CI); elsewhere
those cases skip.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from hp_deepspeed.testing.ranks import base_env, run_command
from hp_deepspeed.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "training" / "tiny_job.yaml")
EXIT_BAD_INPUT, EXIT_IO_ERROR, EXIT_NON_FINITE = 2, 74, 65


def hp(*argv: str, timeout: float = 300):
    """``python -m hp_deepspeed.cli ARGV`` in its own process group; never raises on failure."""
    return run_command([sys.executable, "-m", "hp_deepspeed.cli", *argv], timeout=timeout, cwd=REPO, check=False)


def train(run_dir: Path, *overrides: str, resume: str | None = None):
    argv = ["train", "--config", TINY, f"run.dir={run_dir}", *overrides]
    return hp(*argv, *(["--resume", resume] if resume else []))


def error_line(result) -> str:
    """The one error line of a failed command; fails on a traceback or several error lines."""
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = [line for line in result.output.splitlines() if "error:" in line]
    assert len(lines) == 1, result.output[-3000:]
    return lines[0]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def steps_on_disk(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


@contextmanager
def tmpfs(path: Path, size: str = "64k", read_only: bool = False):
    """A small tmpfs at ``path`` (a full disk is a few writes away); skips without root."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "hp-test", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize("override,expected", [
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=-1e-3", "optim.lr must be positive, got -0.001"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("optim.betas=[-0.1,0.999]", "optim.betas[0] must be in [0, 1), got -0.1"),
    ("optim.eps=0", "optim.eps must be positive, got 0.0"),
    ("optim.eps=.inf", "optim.eps must be a finite number, got inf"),
    ("optim.weight_decay=-0.01", "optim.weight_decay must be >= 0, got -0.01"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm must be >= 0 (0 disables clipping), got -1.0"),
    ("optim.clip_grad_norm=.nan", "optim.clip_grad_norm must be a finite number, got nan"),
    ("training.max_nonfinite_steps=0", "training.max_nonfinite_steps must be >= 1, got 0"),
])
def test_validate_refuses_non_finite_and_out_of_range_optimizer_settings_in_one_line(override, expected, tmp_path,
                                                                                     capsys):
    from hp_deepspeed.cli import main  # in process: validate starts nothing that could differ

    assert main(["validate", "--config", TINY, f"run.dir={tmp_path}/run", override]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [f"hp-deepspeed validate: error: {expected}"]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """lr=1e6 runs: step 1 is finite, from step 2 the loss is NaN. ZeRO-3 (DeepSpeed skips the
    updates), checking every step (a checkpoint and a log record each); stage 0 (torch applies
    them: NaN weights), checking only every 5 steps (log and checkpoint interval 5)."""
    runs = {"zero3": ("ds_configs/zero3_cpu_test.json", "checkpoint.interval=1", "training.log_every=1"),
            "zero0": ("ds_configs/zero0_cpu_test.json", "checkpoint.interval=5", "training.log_every=5")}
    dirs = {name: tmp_path_factory.mktemp(name) for name in runs}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(train, dirs[name], "optim.lr=1e6", "optim.warmup_steps=0", *overrides,
                                     f"training.ds_config={config}")
                   for name, (config, *overrides) in runs.items()}
        return {name: (dirs[name], future.result()) for name, future in futures.items()}


def test_a_diverged_run_checked_every_step_stops_at_the_third_bad_step_and_keeps_the_last_finite_checkpoint(diverged):
    run_dir, result = diverged["zero3"]
    assert result.returncode == EXIT_NON_FINITE, result.output[-3000:]
    line = error_line(result)
    assert ("hp-deepspeed train: error: training stopped at step 4: non-finite loss or gradients for 3 step(s) in a "
            "row since step 2 (training.max_nonfinite_steps=3); ") in line
    # No checkpoint at or after the first non-finite step (steps 2 and 3 were due); step 1 stays latest.
    assert steps_on_disk(run_dir) == ["step-1"] and latest(run_dir) == "step-1"
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(records) == [1, 2, 3, 4] and math.isfinite(records[1]["loss"])
    assert all(math.isnan(records[s]["loss"]) for s in (2, 3, 4))


def test_a_diverged_run_stops_at_its_first_check_point_after_the_third_bad_step_and_saves_nothing_non_finite(diverged):
    run_dir, result = diverged["zero0"]
    assert result.returncode == EXIT_NON_FINITE, result.output[-3000:]
    line = error_line(result)
    assert ("hp-deepspeed train: error: training stopped at step 5: non-finite loss or gradients for 3 step(s) in a "
            "row since step 2 (training.max_nonfinite_steps=3; reached at step 4, checked at step 5); ") in line
    # Step 5 was a save step with NaN weights: the guard was read before the save.
    assert not (run_dir / "checkpoints").exists() or steps_on_disk(run_dir) == []
    # The warnings of the unread steps come out at the check, in step order.
    for step, count in ((2, 1), (3, 2), (4, 3)):
        assert f"step {step}: non-finite loss ({count} in a row" in result.output, result.output[-3000:]
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(records) == [5] and math.isnan(records[5]["loss"])


def test_updates_deepspeed_skips_are_counted_in_the_log(diverged):
    run_dir, result = diverged["zero3"]
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    assert [records[s]["skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert "step 2: non-finite loss and gradient norm, update skipped (1 so far)" in result.output


def test_the_last_finite_checkpoint_of_a_diverged_run_holds_finite_weights(diverged, tmp_path):
    from safetensors.torch import load_file

    run_dir, _ = diverged["zero3"]
    out = tmp_path / "export"
    result = hp("export", "--run-dir", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.output[-3000:]
    # The trained weights; prompts.safetensors holds the hypernetwork's outputs for them, which
    # weights of 1e6 (one update at lr=1e6) overflow, so it is not a test of what was saved.
    for name in ("backbone/model.safetensors", "conditioning.safetensors"):
        tensors = load_file(str(out / name))
        assert tensors and all(t.isfinite().all() for t in tensors.values()), name


def test_train_with_an_infinite_learning_rate_is_refused_before_any_rank_starts(tmp_path):
    result = train(tmp_path / "run", "optim.lr=.inf")
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result) == "hp-deepspeed train: error: optim.lr must be a finite number, got inf"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- one trainer per run dir
@pytest.fixture(scope="module")
def contended(tmp_path_factory):
    """A long run holding the run dir; a second trainer on it; the first SIGKILLed; a resume."""
    run_dir = tmp_path_factory.mktemp("contended")
    first = subprocess.Popen(
        [sys.executable, "-m", "hp_deepspeed.cli", "train", "--config", TINY, f"run.dir={run_dir}",
         "training.steps=100000", "checkpoint.interval=2"],
        cwd=REPO, env=base_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first trainer never saved"
            time.sleep(0.2)
        second = train(run_dir, "training.steps=100000")
        alive_during_second = first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    resume_step = int(latest(run_dir).split("-")[1])
    resumed = train(run_dir, f"training.steps={resume_step + 1}", "checkpoint.interval=1", resume="auto")
    return {"run_dir": run_dir, "first_pid": first.pid, "second": second, "alive": alive_during_second,
            "resume_step": resume_step, "resumed": resumed}


def test_a_second_trainer_on_one_run_dir_is_refused_naming_the_holder(contended):
    import socket

    second = contended["second"]
    assert contended["alive"], "the first trainer ended before the second one started"
    assert second.returncode == EXIT_BAD_INPUT
    line = error_line(second)
    assert f"run.dir={contended['run_dir']} is in use by another trainer (host {socket.gethostname()}, " \
           f"pid {contended['first_pid']}," in line
    assert "ZeRO stage" not in second.output  # refused before the model or engine were built


def test_a_sigkilled_trainer_does_not_block_its_own_resume(contended):
    resumed = contended["resumed"]
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"at step {contended['resume_step']}" in resumed.output
    assert latest(contended["run_dir"]) == f"step-{contended['resume_step'] + 1}"


def test_a_read_only_run_dir_is_one_line_naming_the_path_before_the_model_is_built(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        result = train(ro / "run")
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result) == (f"hp-deepspeed train: error: run.dir={ro}/run is not writable: "
                                  f"{ro}/run: read-only file system (EROFS)")
    assert "ZeRO stage" not in result.output


# ---------------------------------------------------------------- outputs whole, resources in words
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint of each step."""
    run_dir = tmp_path_factory.mktemp("trained")
    result = train(run_dir, "training.steps=2", "checkpoint.interval=1")
    assert result.returncode == 0, result.output[-3000:]
    return run_dir


def export(run_dir: Path, out: Path, *extra: str):
    return hp("export", "--run-dir", str(run_dir), "--out", str(out), *extra)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def step1_export(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("step1") / "export"
    result = export(trained, out, "--checkpoint", "step-1")
    assert result.returncode == 0, result.output[-3000:]
    return out


def test_export_into_a_non_empty_folder_is_refused_and_leaves_it_untouched(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = export(trained, out)
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result) == (f"hp-deepspeed export: error: export --out {out}: folder is not empty (notes.txt); "
                                  "pass --overwrite to replace it as a whole, or choose another folder")
    assert files(out) == {"notes.txt": b"mine"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_with_overwrite_replaces_the_folder_as_a_whole(trained, step1_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(step1_export, out)
    (out / "stale.txt").write_text("from an older export")
    result = export(trained, out, "--checkpoint", "step-2", "--overwrite")
    assert result.returncode == 0, result.output[-3000:]
    old, new = files(step1_export), files(out)
    assert sorted(new) == sorted(old)  # the stale file went with the old folder
    assert json.loads(new["export.json"])["step"] == 2
    # Never the old prompts beside the new backbone.
    for name in ("backbone/model.safetensors", "prompts.safetensors", "conditioning.safetensors"):
        assert new[name] != old[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left


def test_export_of_a_step_whose_config_does_not_match_its_weights_names_the_key(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-2")
    config = run_dir / "checkpoints" / "step-2" / "config.yaml"
    assert "prompt_length: 4" in config.read_text()
    config.write_text(config.read_text().replace("prompt_length: 4", "prompt_length: 6"))
    result = export(run_dir, tmp_path / "out", "--checkpoint", "step-2")
    assert result.returncode == EXIT_BAD_INPUT
    assert error_line(result) == (f"hp-deepspeed export: error: {config}: does not match the weights of step-2: "
                                  "conditioning.prompt_length: config.yaml gives 6, the weights were saved with 4")
    assert not (tmp_path / "out").exists()


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_partial_folder(trained, tmp_path):
    with tmpfs(tmp_path / "small", size="512k") as small:  # the tiny model's weights alone are 1.5 MB
        result = export(trained, small / "export")
        left = sorted(p.name for p in small.iterdir())
    assert result.returncode == EXIT_IO_ERROR
    assert error_line(result) == f"hp-deepspeed export: error: {small}/export: no space left on device (ENOSPC)"
    assert left == []


def test_export_to_a_read_only_folder_is_one_line_naming_it(trained, tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        result = export(trained, ro / "export")
    assert result.returncode == EXIT_IO_ERROR
    assert error_line(result) == f"hp-deepspeed export: error: {ro}: read-only file system (EROFS)"
    assert "Reconstructed" not in result.output  # refused before the weights were loaded


def test_predict_onto_a_full_disk_is_one_line(step1_export, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"sentence1": "a b", "sentence2": "c d"}) + "\n")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "hp_deepspeed.cli", "predict", "--export", str(step1_export),
                               "--task", "glue/rte", "--input", str(rows)],
                              stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, env=base_env(), timeout=300)
    assert proc.returncode == EXIT_IO_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        "hp-deepspeed predict: error: standard output: no space left on device (ENOSPC)"]


def test_convert_universal_refuses_to_replace_a_non_empty_folder_without_overwrite(trained, tmp_path):
    step = tmp_path / "checkpoints" / "step-2"
    shutil.copytree(trained / "checkpoints" / "step-2", step)
    (step / "universal").mkdir()
    (step / "universal" / "notes.txt").write_text("mine")
    refused = hp("convert-universal", str(step))
    assert refused.returncode == EXIT_BAD_INPUT
    assert error_line(refused) == (
        f"hp-deepspeed convert-universal: error: convert-universal: output folder {step}/universal: folder is not "
        "empty (notes.txt); pass --overwrite to replace it as a whole, or choose another folder")
    assert (step / "universal" / "notes.txt").read_text() == "mine"
    replaced = hp("convert-universal", str(step), "--overwrite")
    assert replaced.returncode == 0, replaced.output[-3000:]
    assert (step / "universal" / "COMPLETE").is_file() and not (step / "universal" / "notes.txt").exists()
    # Progress while it converts: each phase of DeepSpeed's tool, then its count a few times.
    parameters = len([p for p in (step / "universal" / "zero").iterdir() if p.is_dir()])
    said = [line for line in replaced.output.splitlines() if line.startswith("convert-universal: ")]
    assert said[0].startswith(f"convert-universal: converting {step} to a universal checkpoint"), said
    assert re.fullmatch(r"convert-universal: converted in \d+\.\ds", said[-1]), said
    assert "convert-universal: 1. extracting ZeRO fragments" in said, said
    assert said.index("convert-universal: 1. extracting ZeRO fragments") < said.index("convert-universal:    1/1 shards")
    merging = said.index("convert-universal: 2. merging slices")
    counts = [line for line in said[merging + 1:] if line.endswith(" parameters")]
    assert counts[-1] == f"convert-universal:    {parameters}/{parameters} parameters", said
    assert 1 <= len(counts) <= 5 < parameters, said  # a few times, not once per parameter


def test_conversion_progress_is_a_line_per_phase_and_its_count_at_each_quarter():
    from hp_deepspeed.checkpointing.universal import ConversionProgress

    said = []
    progress = ConversionProgress(said.append)
    progress.feed("*** 2. Merging slices .....")
    for done in range(0, 201):  # tqdm redraws, with repeats, as DeepSpeed's tool prints them
        progress.feed(f" {done // 2}%|#####     | {done}/200 [00:01<00:01, 99.0it/s]")
        progress.feed(f" {done // 2}%|#####     | {done}/200 [00:01<00:01, 99.0it/s]")
    progress.feed("*** 3. Saving common optimizer states")
    assert said == ["2. merging slices", "   0/200 parameters", "   50/200 parameters", "   100/200 parameters",
                    "   150/200 parameters", "   200/200 parameters", "3. saving common optimizer states"]


def test_convert_universal_of_a_read_only_checkpoint_is_one_line(trained, tmp_path):
    with tmpfs(tmp_path / "ckpt", size="16m") as mount:
        shutil.copytree(trained / "checkpoints" / "step-2", mount / "step-2")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        result = hp("convert-universal", str(mount / "step-2"))
    assert result.returncode == EXIT_IO_ERROR
    assert error_line(result) == f"hp-deepspeed convert-universal: error: {mount}/step-2: read-only file system (EROFS)"


# ---------------------------------------------------------------- saves and resumes
def test_a_full_disk_during_a_save_is_one_line_naming_it_and_leaves_no_partial_checkpoint(tmp_path):
    # The run dir's own files (config, metrics, lock) fit in 1 MiB, the first checkpoint (~5 MB) does not.
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        result = train(disk / "run", "training.steps=4", "checkpoint.interval=2")
        assert result.returncode != 0, result.output[-3000:]
        line = error_line(result)
        assert "no space left on device" in line and str(disk / "run" / "checkpoints") in line, line
        assert not list((disk / "run" / "checkpoints").glob("*.staging")), list((disk / "run" / "checkpoints").iterdir())
        assert not (disk / "run" / "checkpoints" / "latest").exists()


def test_a_training_file_changed_since_the_checkpoint_is_refused_before_the_model_is_built(tmp_path):
    from hp_deepspeed.data.config import BUNDLED_DATA_DIR

    data = tmp_path / "data"
    for task in ("synthetic/first", "glue/rte"):
        shutil.copytree(BUNDLED_DATA_DIR / task, data / task)
    run_dir, data_dir = tmp_path / "run", f"data.data_dir={data}"
    first = train(run_dir, data_dir, "training.steps=2", "checkpoint.interval=2")
    assert first.returncode == 0 and latest(run_dir) == "step-2", first.output[-3000:]
    train_file = data / "synthetic" / "first" / "train.jsonl"
    train_file.write_text(train_file.read_text() + json.dumps({"inputs": "ant bee", "targets": "ant"}) + "\n")

    refused = train(run_dir, data_dir, "training.steps=4", resume="auto")
    assert refused.returncode == EXIT_BAD_INPUT, refused.output[-3000:]
    assert "step-2 does not match this job" in error_line(refused)
    assert str(train_file) in refused.output and "checkpoint.accept_changed_data=true" in refused.output
    assert "ZeRO stage" not in refused.output  # refused before the model or engine were built
    assert latest(run_dir) == "step-2"

    accepted = train(run_dir, data_dir, "training.steps=4", "checkpoint.accept_changed_data=true", resume="auto")
    assert accepted.returncode == 0, accepted.output[-3000:]
    assert latest(run_dir) == "step-4"
