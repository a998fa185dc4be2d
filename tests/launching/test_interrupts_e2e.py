"""A signal to the command a person launched keeps the work and leaves nothing behind.

Each test starts a launch script as a terminal or a scheduler would (its own session, SIGINT at
its default disposition: a process started in the background by a shell script has SIGINT
ignored, and would hide what Ctrl-C does), waits until the 2-rank trainer has logged a few
steps, signals the top process only, and then checks: the exit status, one line for the event
and no traceback, no process of the run left anywhere (found by a marker in the environment
every process of the run inherits), and a complete checkpoint at the step the ranks stopped on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hp_deepspeed.testing.ranks import free_port, tagged_processes
from hp_deepspeed.training.metrics_log import read_metrics
from tests.launching.conftest import REPO, clean_env

LAUNCH = REPO / "launch"
JOB = REPO / "tests" / "training" / "tiny_job.yaml"
MARKER = "HP_INTERRUPT_TEST_RUN"


def run_processes(tag: str) -> list[int]:
    """Every process on this machine whose environment carries this run's marker."""
    return tagged_processes(MARKER, tag)


def start(script: str, run_dir: Path, tag: str, **extra: str) -> subprocess.Popen:
    env = clean_env(HP_MODULE="hp_deepspeed.cli", MASTER_PORT=str(free_port()), **{MARKER: tag}, **extra)
    cmd = [str(LAUNCH / script), "train", "--config", str(JOB), "--resume", "auto", f"run.dir={run_dir}",
           "training.steps=2000", "checkpoint.interval=1000", "training.log_every=1"]
    # A file, not a pipe: nobody reads a pipe while the run trains, and a full one would stall it.
    with open(run_dir / "launch.log", "w") as log:
        return subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def output_of(run_dir: Path) -> str:
    return (run_dir / "launch.log").read_text(errors="replace")


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {output_of(run_dir)[-3000:]}")
        if metrics.exists() and any(r["kind"] == "train" and r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.5)
    pytest.fail(f"no step {step} within {timeout:.0f}s")


def finish(proc: subprocess.Popen, run_dir: Path, tag: str, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in run_processes(tag):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not stop within {timeout:.0f}s of the signal: {output_of(run_dir)[-3000:]}")
    output = output_of(run_dir)
    deadline = time.monotonic() + 10  # a zombie being reaped by its parent may show for a moment
    while run_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = run_processes(tag)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run left behind: {left}\n{output[-3000:]}"
    return output


def last_logged_step(run_dir: Path) -> int:
    return max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")


def assert_saved_soon_after(run_dir: Path, signalled_at: int, output: str) -> None:
    """The last step trained, a few steps after the signal, is the newest checkpoint, whole."""
    step = last_logged_step(run_dir)
    assert signalled_at <= step <= signalled_at + 20, (signalled_at, step, output[-3000:])
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{step}", output[-3000:]
    assert (checkpoints / f"step-{step}" / "COMPLETE").is_file()
    assert not list(checkpoints.glob("*.staging")), list(checkpoints.iterdir())


@pytest.mark.e2e
@pytest.mark.distributed
# Each launch script once; SIGINT and SIGTERM take the same path through the supervisor, so
# each signal is sent to a different launcher (a Ctrl-C through local.sh's deepspeed runner is
# the second-Ctrl-C test's first signal).
@pytest.mark.parametrize("script,signum,extra", [
    ("local.sh", signal.SIGTERM, {"HP_NUM_GPUS": "2"}),
    ("torchrun.sh", signal.SIGTERM, {"HP_NPROC_PER_NODE": "2"}),
    ("mpirun.sh", signal.SIGINT, {"HP_NPROCS": "2"}),
], ids=["local-sigterm", "torchrun-sigterm", "mpirun-ctrl-c"])
def test_a_signal_to_the_launch_script_saves_at_the_interrupted_step_and_leaves_no_process(
        tmp_path, script, signum, extra):
    if script == "mpirun.sh":
        pytest.importorskip("mpi4py")
    tag = uuid.uuid4().hex
    proc = start(script, tmp_path, tag, **extra)
    wait_for_step(proc, tmp_path, 2, timeout=300)
    os.kill(proc.pid, signum)
    sent = time.monotonic()
    output = finish(proc, tmp_path, tag, timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 75, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    if script == "local.sh":  # the deepspeed launcher's info lines are off (--log_level warning)
        assert "Setting CUDA_VISIBLE_DEVICES" not in output and "[INFO] [launch.py" not in output, output[-3000:]
    # One line from the supervisor for the signal, one from rank 0 for the agreed step.
    assert output.count("received: every rank saves a checkpoint") == 1, output[-3000:]
    assert output.count("all ranks save at step") == 1, output[-3000:]
    step = last_logged_step(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{step}", output[-3000:]
    assert (checkpoints / f"step-{step}" / "COMPLETE").is_file()
    assert not list(checkpoints.glob("*.staging")), list(checkpoints.iterdir())
    assert took < 60, f"{took:.0f}s from the signal to the exit"


@pytest.mark.e2e
@pytest.mark.distributed
def test_a_second_ctrl_c_stops_everything_at_once_without_saving(tmp_path):
    tag = uuid.uuid4().hex
    proc = start("local.sh", tmp_path, tag, HP_NUM_GPUS="2")
    wait_for_step(proc, tmp_path, 1, timeout=300)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.5)  # two signals sent back to back arrive as one (standard signals do not queue)
    os.kill(proc.pid, signal.SIGINT)
    output = finish(proc, tmp_path, tag, timeout=30)
    assert proc.returncode == 130, output[-3000:]
    assert "again: stopping every process now, without saving" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    checkpoints = tmp_path / "checkpoints"
    staging = [p.name for p in checkpoints.glob("*.staging")]
    if staging:
        # The second Ctrl-C came in the middle of the first one's save (a loaded machine): the
        # half-written folder is never named by `latest`, and the next start removes it.
        assert len(staging) == 1 and "all ranks save at step" in output, (staging, output[-3000:])
        latest = checkpoints / "latest"
        assert not latest.exists() or f"{latest.read_text().strip()}.staging" != staging[0]
    if (checkpoints / "latest").exists() and not staging:
        # A tiny model saves within the half second between the two signals: then the first
        # Ctrl-C's checkpoint was whole before the second arrived, and rank 0 said so.
        assert "checkpoint of step" in output, output[-3000:]


@pytest.mark.e2e
@pytest.mark.distributed
def test_sigterm_to_a_raw_deepspeed_runner_alone_saves_and_stops_its_orphaned_ranks(tmp_path):
    """The deepspeed runner started by hand (no launch script, no supervisor) dies on SIGTERM and
    leaves its launch.py and the ranks running; the ranks notice their launcher is gone and save
    and stop as on a signal."""
    tag = uuid.uuid4().hex
    env = clean_env(HP_MODULE="hp_deepspeed.cli", HP_DEVICE="cpu", DS_ACCELERATOR="cpu", **{MARKER: tag})
    cmd = ["deepspeed", "--log_level", "warning", "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", "--module", "hp_deepspeed.cli", "train", "--config", str(JOB), f"run.dir={tmp_path}",
           "training.steps=2000", "checkpoint.interval=1000", "training.log_every=1"]
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_step(proc, tmp_path, 2, timeout=300)
    signalled_at = last_logged_step(tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the runner itself passes nothing on
    deadline = time.monotonic() + 60  # its orphans: launch.py and the ranks
    while run_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    output = finish(proc, tmp_path, tag, timeout=0)
    assert output.count("exited: all ranks save at step") == 1, output[-3000:]
    # The watch polls once a second and the ranks agree one step later: a few steps at most.
    assert_saved_soon_after(tmp_path, signalled_at, output)


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.parametrize("launcher,exit_code", [
    ("torchrun", 1),  # torchrun reports the ranks' 75 as a failure of its own
    ("mpich", 75),
])
def test_sigterm_to_raw_torchrun_or_mpich_mpirun_saves_at_one_step_and_leaves_no_process(tmp_path, launcher, exit_code):
    """Started by hand, no launch script: both launchers pass SIGTERM on to their ranks, which
    agree on a step, save it and stop (bench/raw_launcher_signal.py measures the same runs)."""
    if launcher == "mpich":
        pytest.importorskip("mpi4py")
    from bench.raw_launcher_signal import command

    tag = uuid.uuid4().hex
    cmd, extra = command(launcher)
    env = clean_env(HP_DEVICE="cpu", DS_ACCELERATOR="cpu", **extra, **{MARKER: tag})
    cmd += ["train", "--config", str(JOB), f"run.dir={tmp_path}", "training.steps=2000", "checkpoint.interval=1000",
            "training.log_every=1"]
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_step(proc, tmp_path, 2, timeout=300)
    signalled_at = last_logged_step(tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    output = finish(proc, tmp_path, tag, timeout=120)
    assert proc.returncode == exit_code, output[-3000:]
    assert output.count("all ranks save at step") == 1, output[-3000:]
    assert_saved_soon_after(tmp_path, signalled_at, output)


@pytest.mark.parametrize("argv,expected", [
    (["/venv/bin/python", "-u", "-m", "hp_deepspeed.cli", "train"], True),  # deepspeed's, torchrun's, mpirun's rank
    (["python3.11", "-X", "faulthandler", "-m", "hp_deepspeed.cli"], True),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nnodes", "1", "-m", "hp_deepspeed.cli", "train"], False),
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--module", "hp_deepspeed.cli"], False),
    (["/venv/bin/python", "/venv/bin/deepspeed", "--module", "hp_deepspeed.cli", "train"], False),
    (["/venv/bin/hydra_pmi_proxy", "-m", "hp_deepspeed.cli"], False),
    (["python", "-c", "-m hp_deepspeed.cli"], False),
    # deepspeed's mpich runner: its helper starts the rank from launching/entry.py.
    (["/venv/bin/python", "-u", "/repo/hp_deepspeed/launching/entry.py", "hp_deepspeed.cli", "train"], True),
    (["/venv/bin/python", "-u", "/venv/deepspeed/launcher/launcher_helper.py", "--launcher", "mpich",
      "/repo/hp_deepspeed/launching/entry.py", "hp_deepspeed.cli"], False),
    (["/venv/bin/python", "/repo/hp_deepspeed/launching/entry.py", "tests.other_module"], False),
])
def test_the_supervisor_signals_ranks_and_not_the_launchers_that_name_the_module(argv, expected):
    from hp_deepspeed.launching.supervise import is_rank

    assert is_rank(argv, "hp_deepspeed.cli") is expected


def test_the_supervisor_and_the_trainer_agree_on_the_preemption_exit_code():
    from hp_deepspeed.launching import supervise
    from hp_deepspeed.training import preemption

    assert supervise.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED


def test_a_pass_on_a_host_signals_each_rank_of_the_run_once_and_the_last_pass_leaves_nothing(tmp_path, capsys):
    """What the supervisor runs on every host of a multi-node run over pdsh (``--on-node``):
    here on this machine, with a stand-in rank (``python -m MODULE``) and a stand-in launcher
    that carry the run's tag, and a rank of another run that must not be touched."""
    import sys

    from hp_deepspeed.launching import supervise

    tag, other = uuid.uuid4().hex, uuid.uuid4().hex
    # A stand-in rank: records a save-and-stop on SIGTERM (as the trainer does) and exits.
    (tmp_path / "standin_rank.py").write_text(
        "import os, signal, sys, time\n"
        "from hp_deepspeed.launching.supervise import record_preempted\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(record_preempted(75)))\n"
        "time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    env.pop(supervise.STATUS_DIR_ENV, None)
    rank = subprocess.Popen([sys.executable, "-m", "standin_rank"], env=dict(env, **{supervise.RUN_TAG_ENV: tag}))
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                env=dict(env, **{supervise.RUN_TAG_ENV: tag}))
    stranger = subprocess.Popen([sys.executable, "-m", "standin_rank"], env=dict(env, **{supervise.RUN_TAG_ENV: other}))
    try:
        deadline = time.monotonic() + 30
        while len(supervise.run_processes(tag)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(supervise.run_processes(tag)) == sorted([rank.pid, launcher.pid])
        time.sleep(1)  # the stand-in has installed its handler
        for _ in range(2):  # the second pass finds the rank signalled already
            supervise.signal_node(tag, "standin_rank", signal.SIGTERM)
        assert capsys.readouterr().out.split() == ["signalled=1", "signalled=0"]
        assert rank.wait(timeout=30) == 0  # recorded, so it reports success to its launcher
        assert launcher.poll() is None and stranger.poll() is None
        supervise.finish_node(tag, "standin_rank", signal.SIGTERM)
        assert capsys.readouterr().out.split() == ["saved=1", "stopped=1"]
        assert launcher.wait(timeout=30) == -signal.SIGTERM
        assert stranger.poll() is None and supervise.run_processes(tag) == []
        assert not os.path.exists(supervise.node_status_dir(tag))
    finally:
        for proc in (rank, launcher, stranger):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("hostfile,expected", [
    ("missing", "--hostfile {path}: No such file or directory"),
    ("# only a comment\n", "--hostfile {path}: no host in it"),
])
def test_a_hostfile_the_supervisor_cannot_use_is_refused_in_one_line_before_anything_starts(
        tmp_path, capsys, hostfile, expected):
    from hp_deepspeed.launching.supervise import main

    path = tmp_path / "hostfile"
    if hostfile != "missing":
        path.write_text(hostfile)
    with pytest.raises(SystemExit) as exit_info:
        main(["--hostfile", str(path), "--", "true"])
    assert exit_info.value.code == 2
    assert expected.format(path=path) in capsys.readouterr().err.splitlines()[-1]


def test_the_per_node_launcher_s_info_lines_are_left_out_and_everything_else_passes_in_order(capfd):
    """What launch/multinode.sh asks of the supervisor: DeepSpeed's launch.py info lines (pdsh
    prefixes each with its node) go; its warnings, the ranks' lines and a last line without a
    newline pass."""
    from hp_deepspeed.launching.supervise import main

    lines = ["node1: [2026-12-06 10:30:21,402] [INFO] [launch.py:256:main] process 123 spawned with command: [...]",
             "node2: [2026-12-06 10:30:21,402] [INFO] [launch.py:163:main] Setting CUDA_VISIBLE_DEVICES=0",
             "[2026-12-06 10:30:21,402] [INFO] [launch.py:146:main] WORLD INFO DICT: {'node1': [0]}",
             "node1: [2026-12-06 10:30:22,000] [WARNING] [launch.py:259:main] a warning stays",
             "node1: 2026-12-06 10:30:23,000 INFO hp_deepspeed.training.trainer: step 1 loss=2.5",
             "node2: [INFO] [launch.py:1:x] not DeepSpeed's format, stays"]
    script = "".join(f"echo {line!r}; " for line in lines) + "printf 'no newline'"
    assert main(["--drop-node-launcher-info", "--", "sh", "-c", script]) == 0
    assert capfd.readouterr().out == "\n".join(lines[3:]) + "\nno newline"


def test_a_rank_on_a_host_no_pass_reached_yet_records_its_save_when_the_hosts_are_supervised(monkeypatch):
    """The ranks agree on the stop, so a rank on one host may save and stop before the
    supervisor's pass has reached its host: it makes the run's folder there itself and reports
    success to its launcher, as a signalled rank would, but only where a supervisor reaches the
    hosts (one that does not would never count the folder)."""
    import shutil

    from hp_deepspeed.launching import supervise

    tag = uuid.uuid4().hex
    monkeypatch.delenv(supervise.STATUS_DIR_ENV, raising=False)
    monkeypatch.setenv(supervise.RUN_TAG_ENV, tag)
    folder = supervise.node_status_dir(tag)
    try:
        monkeypatch.delenv(supervise.NODES_ENV, raising=False)
        assert supervise.record_preempted(75) == 75 and not os.path.exists(folder)
        monkeypatch.setenv(supervise.NODES_ENV, "1")
        assert supervise.record_preempted(1) == 1 and not os.path.exists(folder)
        assert supervise.record_preempted(75) == 0
        assert os.listdir(folder) == [f"rank-{os.getpid()}"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_rank_records_that_it_is_saving_and_then_that_it_saved_only_under_a_supervisor(tmp_path, monkeypatch):
    from hp_deepspeed.launching import supervise

    for name in (supervise.STATUS_DIR_ENV, supervise.RUN_TAG_ENV, supervise.NODES_ENV):
        monkeypatch.delenv(name, raising=False)
    supervise.record_saving()  # no supervisor: nothing to tell, nowhere to write
    assert supervise.record_preempted(75) == 75
    monkeypatch.setenv(supervise.STATUS_DIR_ENV, str(tmp_path))
    supervise.record_saving()
    assert os.listdir(tmp_path) == [f"saving-{os.getpid()}"]
    assert supervise.saving_ranks(str(tmp_path)) == [os.getpid()]
    assert supervise.record_preempted(75) == 0
    assert os.listdir(tmp_path) == [f"rank-{os.getpid()}"] and supervise.saved_count(str(tmp_path)) == 1
    assert supervise.saving_ranks(str(tmp_path)) == []


@pytest.mark.parametrize("saving,lives_s,timeout,waits_for_exit", [
    (True, 1.5, 30.0, True),  # saving when the launcher exited: waited for, beyond the grace
    (False, 60.0, 30.0, False),  # neither stopping nor saving after the grace: stuck, not waited for
    (True, 60.0, 0.5, False),  # saving for longer than the stop timeout: given up on
], ids=["saving", "stuck", "past-the-timeout"])
def test_ranks_left_by_their_launcher_are_waited_for_only_while_they_save(tmp_path, saving, lives_s, timeout,
                                                                          waits_for_exit):
    """What the supervisor does once the launcher exited with ranks still running (the deepspeed
    runner sent a signal itself exits while its ranks save): a rank saving gets until the stop
    timeout; any other gets the grace, then is stopped."""
    import sys

    from hp_deepspeed.launching import supervise

    rank = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({lives_s})"])
    try:
        if saving:
            (tmp_path / f"saving-{rank.pid}").touch()
        start = time.monotonic()
        supervise.let_ranks_finish(lambda: [rank.pid] if rank.poll() is None else [], str(tmp_path),
                                   grace=0.3, timeout=timeout)
        waited = time.monotonic() - start
        assert (rank.poll() is not None) is waits_for_exit, waited
        if not waits_for_exit:
            assert waited >= min(0.3, timeout) and waited < 10, waited
    finally:
        rank.kill()
        rank.wait()
