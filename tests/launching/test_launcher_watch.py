"""Which process is a rank's launcher, and noticing that it has gone (launching/launcher_watch.py).

The identification runs over fake process tables, one per way a rank is started; one test runs
a real stand-in launcher and kills it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hp_deepspeed.launching.launcher_watch import (
    Process,
    ancestors,
    find_launcher,
    is_alive,
    launcher_name,
    read_process,
)

PY = "/venv/bin/python"
RANK = (PY, "-u", "-m", "hp_deepspeed.cli", "train", "--config", "run.yaml")


def table(*chain: tuple[str, ...]) -> dict[int, Process]:
    """A process table of one chain of processes, parent first: pid 100, 101, ... (the first one's parent is 1)."""
    procs = {}
    for i, argv in enumerate(chain):
        pid = 100 + i
        procs[pid] = Process(pid, pid - 1 if i else 1, 5000 + i, "S", argv)
    return procs


def launcher_of(procs: dict[int, Process]) -> tuple[str, ...] | None:
    found = find_launcher(procs, max(procs))
    return None if found is None else found.argv


@pytest.mark.parametrize("chain,expected", [
    # deepspeed runner by hand: the runner, not its per-node launch.py, is the one a person kills.
    ([("-bash",), (PY, "/venv/bin/deepspeed", "--num_gpus", "2", "--module", "hp_deepspeed.cli"),
      (PY, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--module"), RANK], 1),
    # under the launch scripts' supervisor, which is not a launcher: its launcher is.
    ([("-bash",), (PY, "-m", "hp_deepspeed.launching.supervise", "--", "torchrun"),
      (PY, "/venv/bin/torchrun", "--nproc_per_node", "2", "-m", "hp_deepspeed.cli"), RANK], 2),
    # nohup execs the command and a closed terminal must not stop the run: never the shell or sshd.
    ([("sshd: user@pts/0",), ("-bash",), (PY, "-m", "torch.distributed.run", "-m", "hp_deepspeed.cli"), RANK], 2),
    # MPICH: mpiexec on the launching host; the Hydra proxy on a node it reached over ssh.
    ([("-bash",), ("mpiexec.hydra", "-n", "2"), ("/venv/bin/hydra_pmi_proxy", "--control-port", "h:1"),
      (PY, "-u", "/venv/lib/deepspeed/launcher/launcher_helper.py", "--launcher", "mpich"),
      (PY, "-u", "/repo/hp_deepspeed/launching/entry.py", "hp_deepspeed.cli")], 1),
    ([("sshd: user",), ("bash", "-c", "hydra_pmi_proxy"), ("/venv/bin/hydra_pmi_proxy", "--control-port", "h:1"),
      RANK], 2),
    # Open MPI 5 (prterun, prted on the other nodes) and 4 (orted).
    ([("-bash",), ("mpirun", "-n", "2", "--bind-to", "none"), RANK], 1),
    ([("sshd: user",), ("/opt/openmpi/bin/prted", "--prtemca", "ess", "env"), RANK], 1),
    ([("sshd: user",), ("orted", "-mca", "ess", "env"), RANK], 1),
    # deepspeed's pdsh runner on another node: launch.py started by a shell of pdsh's ssh session.
    ([("sshd: user",), ("bash", "-c", "export PYTHON_HP_RUN=x; cd /repo; python -u -m deepspeed.launcher.launch"),
      (PY, "-u", "-m", "deepspeed.launcher.launch", "--node_rank=1"), RANK], 2),
    # No launcher: a rank started by a test or by hand, or under SLURM's step daemon.
    ([("-bash",), (PY, "-m", "pytest", "tests"), RANK], None),
    ([("slurmstepd: [12.0]",), RANK], None),
], ids=["deepspeed-runner", "supervisor-torchrun", "terminal-torchrun-module", "mpich", "mpich-remote",
        "openmpi", "openmpi5-remote", "openmpi4-remote", "pdsh-remote", "pytest", "slurm"])
def test_a_rank_s_launcher_is_its_topmost_launcher_ancestor_never_a_shell_or_terminal(chain, expected):
    procs = table(*chain)
    assert launcher_of(procs) == (None if expected is None else chain[expected])


@pytest.mark.parametrize("argv,expected", [
    ((PY, "/venv/bin/deepspeed", "--hostfile", "h"), "deepspeed"),
    (("/venv/bin/torchrun", "--standalone"), "torchrun"),
    (("python3.11", "-X", "faulthandler", "-m", "torch.distributed.run"), "torch.distributed.run"),
    (("/usr/bin/mpiexec", "-n", "2"), "mpiexec"),
    ((PY, "-c", "import deepspeed"), None),
    ((PY, "/repo/scripts/deepspeed_tool.py"), None),
    (("bash", "-c", "deepspeed --num_gpus 2 train.py"), None),
    (("nohup",), None),
    ((), None),
])
def test_launchers_are_named_by_their_program_script_or_module(argv, expected):
    assert launcher_name(argv) == expected


def test_a_loop_or_a_gap_in_the_process_table_ends_the_walk():
    looped = {10: Process(10, 11, 1, "S", RANK), 11: Process(11, 10, 1, "S", ("mpirun",))}
    assert find_launcher(looped, 10).pid == 11
    assert find_launcher({10: Process(10, 99, 1, "S", RANK)}, 10) is None  # parent not readable
    assert find_launcher({}, 10) is None


def test_a_reused_pid_or_a_zombie_is_not_the_launcher_any_more():
    me = read_process(os.getpid())
    assert me is not None and is_alive(me)
    assert not is_alive(Process(me.pid, me.ppid, me.start + 1, "S", me.argv))  # another process, same pid
    assert ancestors(os.getpid())[os.getpid()] == me


def test_a_rank_whose_launcher_is_killed_hears_of_it_once_within_seconds(tmp_path):
    """A stand-in launcher (a script named ``torchrun``) starts a rank that watches it; SIGKILL
    to the launcher alone, and the rank reports the launcher's pid, once."""
    launcher = tmp_path / "torchrun"
    launcher.write_text(f"#!{sys.executable}\n"
                        "import subprocess, sys, time\n"
                        f"subprocess.Popen([{sys.executable!r}, '-m', 'watching_rank'])\n"
                        "time.sleep(120)\n")
    launcher.chmod(0o755)
    (tmp_path / "watching_rank.py").write_text(
        "import sys, time\n"
        "from hp_deepspeed.launching.launcher_watch import watch_launcher\n"
        "calls = []\n"
        "watch = watch_launcher(lambda p: calls.append(p.pid), poll_s=0.1)\n"
        "print('watching', watch.launcher.pid if watch else None, flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        "while not calls and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(0.5)  # a second call would come within this\n"
        "print('gone', calls, flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "rank.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([str(launcher)], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "watching" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text().split() == ["watching", str(proc.pid)], out.read_text()
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while "gone" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text().split()[2:] == ["gone", f"[{proc.pid}]"], out.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_a_gone_launcher_stops_training_like_a_signal_with_one_line_naming_it(caplog):
    """The preemption handler turns the watch's call into the stop flag, and rank 0 names the
    launcher in its one line (alone, a rank decides at once)."""
    import logging

    from hp_deepspeed.training.preemption import PreemptionHandler

    handler = PreemptionHandler()
    handler.speaks = True
    assert not handler.should_stop(1)
    handler._on_launcher_gone(Process(4242, 1, 7, "S", (PY, "/venv/bin/deepspeed", "--num_gpus", "2")))
    with caplog.at_level(logging.WARNING, logger="hp_deepspeed.training.preemption"):
        assert handler.should_stop(2) and handler.stop_step == 2
    assert [r.getMessage() for r in caplog.records] == [
        "the launcher deepspeed (pid 4242) exited: all ranks save at step 2 and stop"]
