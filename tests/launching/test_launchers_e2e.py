"""launch/*.sh end to end: real launchers start 2 ranks of a ZeRO-3 job on the CPU.

Each run goes through hp_deepspeed.launching.distributed.init_distributed, so every test also
checks which launcher environment the ranks found (``source``) and that they agree on it.
torchrun, ``mpirun`` (MPICH and Open MPI) and deepspeed's MPICH runner start the real trainer
(``tests.scripts.trainer_probe``: the CLI, recording each rank's place); the other runners start
the light stand-in ``tests/scripts/launch_workload.py``, since the trainer already runs under
them in tests/launching/test_multinode_e2e.py (pdsh, MPICH and Open MPI runners across two nodes) and
tests/training/test_trainer_e2e.py (the deepspeed launcher).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from hp_deepspeed.testing.ranks import free_port
from hp_deepspeed.training.metrics_log import read_metrics
from tests.launching.conftest import LOOPBACK_NODES, REPO, launch

pytestmark = pytest.mark.e2e
LAUNCH = REPO / "launch"
STEPS = 3
TRAINER = {"HP_MODULE": "tests.scripts.trainer_probe"}
JOB = REPO / "tests" / "training" / "tiny_job.yaml"


def check_ranks(run_dir: Path, source: str, output: str) -> list[dict]:
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1], output[-3000:]
    for r in ranks:
        assert (r["world_size"], r["local_world_size"], r["source"]) == (2, 2, source), r
        assert (r["start_step"], r["end_step"], r["preempted"]) == (0, STEPS, False), r
        assert r["local_rank"] == r["rank"]
        assert (run_dir / f"steps-rank{r['rank']}.txt").read_text().split() == [
            str(s) for s in range(STEPS)]
    # ZeRO-3 ran: the ranks saw different data, the same master.
    assert len({(r["master_addr"], r["master_port"]) for r in ranks}) == 1
    assert ranks[0]["loss"] != ranks[1]["loss"]
    return ranks


def trainer_args(run_dir: Path) -> list[str]:
    return ["train", "--config", str(JOB), "--resume", "auto", f"run.dir={run_dir}",
            f"training.steps={STEPS}", "checkpoint.interval=2", "eval.every=0"]


def check_trainer_ranks(run_dir: Path, source: str, output: str) -> list[dict]:
    """The trainer ran on 2 ranks that found each other through ``source``: it logged every
    step, kept its checkpoints, and the launcher's exit status was 0 (``launch`` checks it)."""
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1], output[-3000:]
    for r in ranks:
        assert (r["world_size"], r["local_world_size"], r["source"]) == (2, 2, source), r
        assert r["local_rank"] == r["rank"]
    assert len({(r["master_addr"], r["master_port"]) for r in ranks}) == 1
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), output[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS}", output[-3000:]
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "COMPLETE").is_file()
    return ranks


def relayed_by(output: str, host: str, text: str) -> bool:
    """Whether pdsh relayed ``text`` from ``host``: on a line it prefixed with the host name.
    Two ranks of one host share its stream and may interleave their lines, so ``text`` need
    not follow the prefix directly."""
    return any(line.startswith(f"{host}: ") and text in line for line in output.splitlines())


def workload_args(run_dir: Path) -> list[str]:
    # --resume auto goes through every launcher's argument passing along with the overrides.
    return ["train", "--resume", "auto", f"run.dir={run_dir}", f"train.steps={STEPS}"]


def test_deepspeed_one_node(tmp_path):
    port = free_port()
    out = launch([str(LAUNCH / "local.sh"), *workload_args(tmp_path)], timeout=240,
                 HP_NUM_GPUS="2", MASTER_PORT=str(port)).output
    ranks = check_ranks(tmp_path, "deepspeed", out)
    assert ranks[0]["master_port"] == port


def test_torchrun(tmp_path):
    out = launch([str(LAUNCH / "torchrun.sh"), *trainer_args(tmp_path)], timeout=300,
                 HP_NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), **TRAINER).output
    check_trainer_ranks(tmp_path, "torchrun", out)


@pytest.mark.parametrize("mpi", ["mpich", "openmpi"])
def test_mpirun_rank_discovery_through_mpi4py(tmp_path, request, mpi):
    """launch/mpirun.sh under pip's MPICH (the venv's mpirun) and under Open MPI: the one
    mpi4py wheel finds the ranks with either library."""
    pytest.importorskip("mpi4py")
    if mpi == "openmpi":
        env = request.getfixturevalue("openmpi_env")
    elif shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun"):
        env = {}
    else:
        pytest.skip("no mpirun (pip install mpich, or the system MPI)")
    out = launch([str(LAUNCH / "mpirun.sh"), *trainer_args(tmp_path)], timeout=300,
                 HP_NPROCS="2", **env, **TRAINER).output
    ranks = check_trainer_ranks(tmp_path, "mpi", out)
    assert ranks[0]["master_port"] > 0  # chosen by rank 0 and broadcast
    assert (ranks[0]["mpi_library"].startswith("Open MPI")) == (mpi == "openmpi"), ranks[0]


def test_deepspeed_hostfile_mpich_runner(tmp_path):
    """`deepspeed --hostfile --launcher mpich` on a one-host hostfile. --force_multi takes the
    multi-node path although there is one host; --no_ssh_check because MPICH's Hydra starts
    local ranks without ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# host slots\nlocalhost slots=2\n")
    run_dir = tmp_path / "run"
    out = launch([str(LAUNCH / "multinode.sh"), *trainer_args(run_dir)], timeout=300,
                 HP_HOSTFILE=str(hostfile), HP_LAUNCHER="mpich", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()),
                 HP_LAUNCHER_ARGS="--force_multi --no_ssh_check --log_level info", **TRAINER).output
    assert "mpirun -n 2 -ppn 2" in out, out[-3000:]  # really the MPICH runner (the runner's info line)
    check_trainer_ranks(run_dir, "deepspeed", out)


def test_deepspeed_hostfile_openmpi_runner(tmp_path, openmpi_env):
    """`deepspeed --hostfile --launcher openmpi`: Open MPI's mpirun starts the ranks, mpi4py
    (on Open MPI's ABI) finds them, and the master endpoint given to the launcher reaches them
    through the script's `-x MASTER_ADDR -x MASTER_PORT`."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    port = free_port()
    out = launch([str(LAUNCH / "multinode.sh"), *workload_args(run_dir)], timeout=300,
                 HP_HOSTFILE=str(hostfile), HP_LAUNCHER="openmpi", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), HP_LAUNCHER_ARGS="--force_multi --no_ssh_check --log_level info",
                 **openmpi_env).output
    assert f"mpirun -n 2 -hostfile {hostfile}" in out, out[-3000:]  # really the openmpi runner (its info line)
    assert "--bind-to none" in out, out[-3000:]
    ranks = check_ranks(run_dir, "mpi", out)
    assert (ranks[0]["master_addr"], ranks[0]["master_port"]) == ("127.0.0.1", port)
    assert ranks[0]["mpi_library"].startswith("Open MPI"), ranks[0]


def test_deepspeed_hostfile_pdsh_runner(tmp_path, local_sshd):
    """`deepspeed --hostfile --launcher pdsh`: pdsh really sshes to this machine (a private
    sshd, see conftest.local_sshd) and starts deepspeed's per-node launcher there."""
    ssh_env, port = local_sshd
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    out = launch([str(LAUNCH / "multinode.sh"), *workload_args(run_dir)], timeout=400,
                 HP_HOSTFILE=str(hostfile), HP_LAUNCHER="pdsh", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()),
                 HP_LAUNCHER_ARGS=f"--force_multi --no_ssh_check --ssh_port {port}", **ssh_env).output
    assert relayed_by(out, "localhost", "[workload] rank 0/2"), out[-3000:]  # pdsh relayed it
    check_ranks(run_dir, "deepspeed", out)


def test_deepspeed_hostfile_two_nodes_pdsh(tmp_path, local_sshd):
    """A two-line hostfile, one slot each: pdsh sshes to two addresses of this machine, each
    starts deepspeed's per-node launcher with its node rank, and the two one-rank "nodes" meet
    at the master address the script takes from the hostfile's first line (no MASTER_ADDR)."""
    ssh_env, port = local_sshd
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in LOOPBACK_NODES))
    run_dir = tmp_path / "run"
    out = launch([str(LAUNCH / "multinode.sh"), *workload_args(run_dir)], timeout=400,
                 HP_HOSTFILE=str(hostfile), HP_LAUNCHER="pdsh", MASTER_PORT=str(free_port()),
                 HP_LAUNCHER_ARGS=f"--no_ssh_check --ssh_port {port}", **ssh_env).output
    for node in LOOPBACK_NODES:
        assert relayed_by(out, node, "[workload] rank"), out[-3000:]  # each from its own host
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    assert [(r["rank"], r["local_rank"], r["world_size"], r["local_world_size"]) for r in ranks] \
        == [(0, 0, 2, 1), (1, 0, 2, 1)], out[-3000:]
    assert {(r["master_addr"], r["source"], r["end_step"]) for r in ranks} == {
        (LOOPBACK_NODES[0], "deepspeed", STEPS)}
    assert ranks[0]["loss"] != ranks[1]["loss"]


def test_launch_scripts_refuse_missing_settings(tmp_path):
    for script, var in (("multinode.sh", "HP_HOSTFILE"), ("mpirun.sh", "HP_NPROCS")):
        result = launch([str(LAUNCH / script), "train"], timeout=60, check=False)
        assert result.returncode != 0 and var in result.output, result.output
