"""Two real nodes: each a network namespace with its own address, slurmd and sshd
(scripts/netns_cluster.sh, the ``netns_cluster`` fixture). CPU, gloo, one rank per node.

What one node hides and these tests see: the master address from SLURM_JOB_NODELIST on the
second node, node ranks, the rendezvous over a real interface (``eth0`` of each node, named by
HP_SOCKET_IFNAME in the SLURM and Open MPI runs, found by gloo from the node's host name in the
pdsh and MPICH runs), ssh to another host, and a node dying.

Faults injected and survived: in ``trained_over_two_nodes``
every rank dies in the middle of a checkpoint save (1), node2's rank is SIGKILLed mid-training
(2), SIGTERM goes to the top process of the job's step only (3: a person's or a wrapper's `kill`;
the batch shell's USR1 is test_slurm_trainer.py's); all three end in a run equal to an
uninterrupted one.
``test_wrong_interface_fails_fast`` injects a fourth (a loopback interface across nodes), which
ends the job with a message instead of a hang.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hp_deepspeed.launching.supervise import RUN_TAG_ENV, is_rank
from hp_deepspeed.testing.ranks import free_port, tagged_processes
from hp_deepspeed.training.metrics_log import read_metrics
from tests.launching.conftest import (
    NETNS_NODES,
    OPENMPI_PREFIX,
    REPO,
    clean_env,
    launch,
    node_pids,
    sbatch,
    scontrol,
    wait_for_job,
)

# The first test that asks for the shared run pays for all of it (several jobs in a row).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]
JOB = REPO / "tests" / "training" / "tiny_job.yaml"
STEPS, INTERVAL, CRASH_AT = 12, 2, 4
JOB_TIMEOUT = 600  # generous: the machine's 2 cores are shared
TRAIN_ARGS = ["--config", str(JOB), f"training.steps={STEPS}", f"checkpoint.interval={INTERVAL}",
              "eval.every=0"]
NODE_ADDR = {"node1": "10.231.0.11", "node2": "10.231.0.12"}


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["kind"] == "train"] if path.is_file() else []


def latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def step_of(tag: str | None) -> int:
    return int(tag.split("-")[1]) if tag else -1


def wait_until(what: str, predicate, timeout: float, job: str, conf: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=30, env=dict(os.environ, SLURM_CONF=conf))
            pytest.fail(f"job {job}: {what} did not happen in {timeout:.0f}s")
        time.sleep(0.5)


def submit(env: dict, run_dir: Path, log_dir: Path, nodes: int, per_node: int, **extra: str) -> str:
    return sbatch([f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--output={log_dir}/%x-%j.out",
                   "slurm/train.sbatch", *TRAIN_ARGS],
                  HP_DEVICE="cpu", HP_RUN_DIR=str(run_dir), HP_MODULE="tests.scripts.trainer_probe",
                  HP_SOCKET_IFNAME="eth0", HP_DIST_TIMEOUT="120", HP_EXIT_WAIT="60", **env, **extra)


@dataclass
class Chain:
    """What the fault-injected two-node run left behind, for the tests below to judge."""

    run_dir: Path
    crash_state: dict = field(default_factory=dict)
    kill: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)
    srun_signalled_at: int = -1


@pytest.fixture(scope="module")
def one_node_losses(netns_cluster, tmp_path_factory) -> dict[int, float]:
    """The reference: the same global batch (2 ranks x micro-batch) on one node, uninterrupted."""
    tmp = tmp_path_factory.mktemp("one_node")
    conf = netns_cluster["SLURM_CONF"]
    job = submit(netns_cluster, tmp / "run", tmp, nodes=1, per_node=2)
    info = wait_for_job(job, JOB_TIMEOUT, tmp / "hp-train-*.out", conf=conf)
    assert info["JobState"] == "COMPLETED", (info, (tmp / f"hp-train-{job}.out").read_text()[-4000:])
    return {r["step"]: r["loss"] for r in train_records(tmp / "run")}


@pytest.fixture(scope="module")
def trained_over_two_nodes(netns_cluster, tmp_path_factory) -> Chain:
    """One run over two nodes through three faults (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    conf = netns_cluster["SLURM_CONF"]
    chain = Chain(tmp / "run")
    run_dir = chain.run_dir

    # 1. Every rank dies in the middle of saving step-4 (shards written, no COMPLETE marker).
    crashed = submit(netns_cluster, run_dir, tmp, nodes=2, per_node=1, HP_CRASH_IN_SAVE=str(CRASH_AT))
    info = wait_for_job(crashed, JOB_TIMEOUT, tmp / "hp-train-*.out", conf=conf)
    chain.logs["crash"] = (tmp / f"hp-train-{crashed}.out").read_text()
    chain.crash_state = {"state": info["JobState"], "latest": latest(run_dir),
                         "staging": sorted(p.name for p in (run_dir / "checkpoints").glob("*.staging"))}

    # 2. A new job resumes; once it has committed a checkpoint past the crash, node2's rank is
    #    SIGKILLed. Node1's rank must end on its own, naming the rank it lost.
    job = submit(netns_cluster, run_dir, tmp, nodes=2, per_node=1)
    log = tmp / f"hp-train-{job}.out"
    wait_until("a checkpoint after the crash", lambda: step_of(latest(run_dir)) > CRASH_AT, JOB_TIMEOUT, job, conf)
    victims = node_pids("node2", "tests.scripts.trainer_probe")
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    info = wait_for_job(job, JOB_TIMEOUT, tmp / "hp-train-*.out", conf=conf)
    chain.kill = {"victims": victims, "state": info["JobState"], "ended_after_s": time.monotonic() - killed_at,
                  "latest": latest(run_dir)}
    chain.logs["killed"] = log.read_text()

    # 3. Requeued (what SLURM does after a node failure with --requeue), it resumes; once it has
    #    trained a step, SIGTERM goes to the step's top process on node1 (the supervisor around
    #    srun) and to nothing else. It becomes USR1 to srun, which reaches the tasks on both
    #    nodes; they save and stop, the batch script requeues the job, which resumes and finishes.
    logged = len(train_records(run_dir))
    scontrol("requeue", job, conf=conf, check=True)
    wait_until("a step after the requeue", lambda: len(train_records(run_dir)) > logged,
               JOB_TIMEOUT, job, conf)
    tops = node_pids("node1", "hp_deepspeed.launching.supervise")
    assert len(tops) == 1, tops
    os.kill(tops[0], signal.SIGTERM)
    chain.srun_signalled_at = step_of(latest(run_dir))
    info = wait_for_job(job, 2 * JOB_TIMEOUT, tmp / "hp-train-*.out", conf=conf)
    chain.final = {"state": info["JobState"], "restarts": info["Restarts"], "latest": latest(run_dir)}
    chain.logs["final"] = log.read_text()
    return chain


def test_crash_of_every_rank_mid_save_keeps_the_previous_checkpoint(trained_over_two_nodes):
    chain = trained_over_two_nodes
    text = chain.logs["crash"]
    assert chain.crash_state == {"state": "FAILED", "latest": f"step-{CRASH_AT - INTERVAL}",
                                 "staging": [f"step-{CRASH_AT}.staging"]}, text[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: dying in the middle of saving step {CRASH_AT}" in text
    # The next job picked the previous checkpoint, not the half-written one.
    resumed = chain.run_dir / "checkpoints" / f"step-{CRASH_AT - INTERVAL}"
    assert f"resumed from {resumed} at step {CRASH_AT - INTERVAL}" in chain.logs["killed"]


def test_node_loss_ends_the_job_naming_the_lost_rank(trained_over_two_nodes):
    chain = trained_over_two_nodes
    text = chain.logs["killed"]
    assert chain.kill["victims"] and chain.kill["state"] == "FAILED", (chain.kill, text[-4000:])
    # Bounded: srun's --wait (HP_EXIT_WAIT=60) and the collective timeout (HP_DIST_TIMEOUT=120)
    # are both far below the time limit; node1's rank did not wait for either.
    assert chain.kill["ended_after_s"] < 120, chain.kill
    assert "hp-deepspeed train: error: rank 0 lost rank 1 on node2 (10.231.0.12)" in text, text[-4000:]
    # The requeued job resumed from the last checkpoint committed before the kill.
    resumed = chain.run_dir / "checkpoints" / chain.kill["latest"]
    step = step_of(chain.kill["latest"])
    assert f"resumed from {resumed} at step {step}" in chain.logs["final"]


def test_preempted_requeued_and_finished_on_both_nodes(trained_over_two_nodes):
    chain = trained_over_two_nodes
    text = chain.logs["final"]
    assert chain.final == {"state": "COMPLETED", "restarts": "2", "latest": f"step-{STEPS}"}, text[-4000:]
    # SIGTERM to the step reached both ranks (as srun's USR1): they agreed on a step, saved it,
    # and the job requeued.
    assert text.count("SIGTERM received: every rank saves a checkpoint") == 1, text[-4000:]
    saved = re.findall(r"preemption requested \(SIGUSR1\): all ranks save at step (\d+)", text)
    assert len(saved) == 1 and int(saved[0]) > chain.srun_signalled_at, text[-4000:]
    assert f"resumed from {chain.run_dir / 'checkpoints' / f'step-{saved[0]}'} at step {saved[0]}" in text
    assert "training step exited with 75" in text and "caught SIG" not in text, text[-4000:]
    assert (chain.run_dir / "checkpoints" / f"step-{STEPS}" / "COMPLETE").is_file()
    # Every start of the job put rank r on node r+1, as node rank r, meeting at node1 over eth0.
    records = [json.loads(p.read_text()) for p in sorted((chain.run_dir / "ranks").glob("*.json"))]
    assert len(records) == 2 * 4, records  # crashed job + three starts of the second job
    for r in records:
        node = NETNS_NODES[r["rank"]]
        assert (r["node"], r["node_id"], r["world_size"], r["local_world_size"], r["source"]) == (
            node, str(r["rank"]), 2, 1, "slurm"), r
        assert (r["master_addr"], r["gloo_ifname"], r["address"]) == ("node1", "eth0", NODE_ADDR[node]), r


def test_losses_equal_a_one_node_run_of_the_same_global_batch(trained_over_two_nodes, one_node_losses):
    chain = trained_over_two_nodes
    records = train_records(chain.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sorted(one_node_losses) == list(range(1, STEPS + 1))
    # Bit for bit: the same global batch over two nodes, through three faults, as on one node.
    assert {r["step"]: r["loss"] for r in records} == one_node_losses
    # Steps run twice (before the crash, and again after the resume from the checkpoint before
    # it) logged the same loss both times. Rank 0 logs each step, to 4 significant digits.
    logged = re.findall(r"INFO hp_deepspeed\.training\.trainer: step (\d+) loss=(\S+)",
                        chain.logs["crash"] + chain.logs["final"])
    assert len(logged) > STEPS, logged  # the replayed steps are among them
    assert {(int(step), loss) for step, loss in logged} == {
        (step, f"{loss:.4g}") for step, loss in one_node_losses.items()}


def test_wrong_interface_fails_fast(netns_cluster, tmp_path):
    """GLOO_SOCKET_IFNAME=lo across two nodes: gloo would advertise 127.0.0.1 to the other node
    and wait for the collective timeout; the check in init_distributed ends it at once."""
    conf = netns_cluster["SLURM_CONF"]
    job = sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch"],
                 HP_DEVICE="cpu", HP_RUN_DIR=str(tmp_path / "run"), HP_MODULE="tests.scripts.launch_workload",
                 GLOO_SOCKET_IFNAME="lo", HP_DIST_TIMEOUT="600", **netns_cluster)
    info = wait_for_job(job, JOB_TIMEOUT, tmp_path / "hp-train-*.out", conf=conf)
    text = (tmp_path / f"hp-train-{job}.out").read_text()
    assert info["JobState"] == "FAILED", (info, text[-4000:])
    assert re.search("GLOO_SOCKET_IFNAME=lo: a loopback interface, which the other nodes of this 2-node "
                     r"job cannot reach on node[12] \(its interfaces: lo 127\.0\.0\.1, eth0 10\.231\.0\.1[12]\)",
                     text), text[-4000:]
    assert "set HP_SOCKET_IFNAME to the interface that reaches MASTER_ADDR=node1 (here: eth0)" in text


# ----------------------------------------------------------------------------- hostfile launchers

# deepspeed checks each host with a plain `ssh HOST hostname`, which does not know the cluster's
# key (it lives in the runners' ssh options, not in ~/.ssh): the runners themselves reach the nodes.
NO_SSH_CHECK = "--no_ssh_check"
# The venv's interpreter under its versioned name: the name the `deepspeed` script's first line
# does not use (see interrupt_two_node_run).
RUNNER_PYTHON = str(Path(sys.executable).parent / f"python{sys.version_info.major}.{sys.version_info.minor}")


def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("".join(f"{node} slots=1\n" for node in NETNS_NODES))
    return path


def workload_args(run_dir: Path) -> list[str]:
    return ["train", "--resume", "auto", f"run.dir={run_dir}", "train.steps=3"]


# A run started without the supervisor carries the test's own tag: the supervisor's would change
# how its ranks record a stop. PYTHON*, so that the pdsh runner exports it to the hosts.
TEST_TAG_ENV = "PYTHON_HP_TEST_RUN"


def run_pids(node: str, tag: str, name: str = RUN_TAG_ENV) -> list[int]:
    """Processes in ``node``'s namespace that carry run ``tag`` in their environment variable
    ``name``: every process of the run there, whatever started it."""
    return tagged_processes(name, tag, node_pids(node, ""))


@dataclass
class Interrupted:
    """What a two-node run of multinode.sh interrupted by one signal to its top process left."""

    returncode: int
    output: str
    run_dir: Path
    ranks_on: dict  # node -> the run's rank processes there just before the signal
    left: dict  # node -> the run's processes there afterwards
    took: float  # seconds from the signal to the script's exit
    gone: float  # seconds from the signal until no process of the run was left on either node


def interrupt_two_node_run(tmp_path: Path, launcher: str, signum: int, runner_alone: bool = False,
                           **extra: str) -> Interrupted:
    """launch/multinode.sh over node1 and node2 with the real trainer; once it has logged step 2,
    ``signum`` goes to the script's process (the supervisor it became) and to nothing else. With
    ``runner_alone``, the deepspeed runner is started by hand as multinode.sh would start it, but
    without the supervisor, and the signal goes to the runner."""
    run_dir, tag = tmp_path / "run", uuid.uuid4().hex
    port, tag_env = str(free_port()), TEST_TAG_ENV if runner_alone else RUN_TAG_ENV
    env = clean_env(**{"HP_LAUNCHER_ARGS": NO_SSH_CHECK, **extra}, HP_HOSTFILE=str(hostfile(tmp_path)),
                    HP_LAUNCHER=launcher, MASTER_PORT=port, HP_MODULE="tests.scripts.trainer_probe",
                    HP_STOP_TIMEOUT="120", **{tag_env: tag})
    args = ["train", *TRAIN_ARGS[:2], "--resume", "auto", f"run.dir={run_dir}", "training.steps=2000",
            "checkpoint.interval=1000", "eval.every=0"]
    command = [str(REPO / "launch" / "multinode.sh"), *args]
    if runner_alone:
        # DeepSpeed's handler kills `pkill -f "<its python> -u -m deepspeed.launcher.launch"` on
        # every host, which matches every DeepSpeed launcher on these hosts started by the same
        # interpreter path; the nodes share this machine's processes, so the runner runs under
        # another name of the venv's interpreter, and the other tests' launchers survive.
        command = [RUNNER_PYTHON, str(Path(sys.executable).parent / "deepspeed"), "--log_level", "warning", NO_SSH_CHECK,
                   "--hostfile", str(hostfile(tmp_path)),
                   "--launcher", launcher, "--master_addr", NETNS_NODES[0], "--master_port", port,
                   "--no_local_rank", "--module", "tests.scripts.trainer_probe", *args]
    log = tmp_path / "launch.log"
    with open(log, "w") as out:  # a file: nobody reads a pipe while the run trains
        # SIGINT at its default, as in a terminal (a script's background job has it ignored).
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while step_of_metrics(run_dir) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        ranks_on = {node: [p for p in run_pids(node, tag, tag_env) if is_rank(
            Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").split("\0"), "tests.scripts.trainer_probe")]
            for node in NETNS_NODES}
        os.kill(proc.pid, signum)
        sent = time.monotonic()
        proc.wait(timeout=180)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A zombie being reaped by its parent may show for a moment. The runner alone exits before
    # the ranks: DeepSpeed's per-node launcher gives them 30 s after its SIGTERM, then SIGKILL.
    deadline = time.monotonic() + (40 if runner_alone else 10)
    while any(run_pids(node, tag, tag_env) for node in NETNS_NODES) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = time.monotonic() - sent
    left = {node: run_pids(node, tag, tag_env) for node in NETNS_NODES}
    for pid in sum(left.values(), []):
        os.kill(pid, signal.SIGKILL)
    return Interrupted(proc.returncode, log.read_text(errors="replace"), run_dir, ranks_on, left, took, gone)


def check_saved_and_gone(run: Interrupted, source: str, runner_alone: bool = False) -> list[dict]:
    text = run.output
    # Each node ran a rank of the run before the signal (its process, not only its log lines).
    assert all(len(pids) == 1 for pids in run.ranks_on.values()), (run.ranks_on, text[-4000:])
    assert run.left == {node: [] for node in NETNS_NODES}, text[-4000:]
    step = step_of_metrics(run.run_dir)
    if runner_alone:
        # DeepSpeed's handler exits 1 a second after its `pkill` over the hosts, while the ranks
        # still save; their output after the signal is lost with pdsh's ssh sessions.
        assert run.returncode == 1 and "Traceback" not in text, text[-4000:]
        assert run.gone < 40, f"{run.gone:.0f}s from the signal until the last process of the run was gone"
    else:
        assert run.returncode == 75, text[-4000:]
        assert "Traceback" not in text and text.count("received: every rank saves a checkpoint") == 1, text[-4000:]
        assert re.search(rf"all ranks save at step {step}\b", text), text[-4000:]
    # The last step trained is the checkpoint's: every rank stopped at it and saved it whole.
    assert latest(run.run_dir) == f"step-{step}", text[-4000:]
    assert (run.run_dir / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    assert not list((run.run_dir / "checkpoints").glob("*.staging"))
    assert run.took < 90, f"{run.took:.0f}s from the signal to the exit"
    # Rank r ran on node r+1 as the only rank there, meeting at node1.
    records = [json.loads(p.read_text()) for p in sorted((run.run_dir / "ranks").glob("*.json"))]
    assert [(r["rank"], r["local_rank"], r["world_size"], r["local_world_size"], r["source"]) for r in records] == [
        (0, 0, 2, 1, source), (1, 0, 2, 1, source)], records
    return records


# The lines DeepSpeed's launchers print at INFO, which multinode.sh leaves out.
LAUNCHER_INFO = ("[INFO] [launch.py", "[INFO] [runner.py", "Setting CUDA_VISIBLE_DEVICES")


# This machine's host name resolves to loopback: Hydra's proxies on the nodes reach mpiexec at
# the name of the nodes' bridge (scripts/netns_cluster.sh).
@pytest.mark.parametrize("launcher,source,runner_alone,extra", [  # deepspeed's launcher_helper.py sets RANK for mpich
    ("pdsh", "deepspeed", False, {}), ("mpich", "deepspeed", False, {"HP_MPIRUN_ARGS": "-localhost hphead"}),
    ("pdsh", "deepspeed", True, {})], ids=["pdsh", "mpich", "pdsh-runner-alone"])
def test_sigterm_to_the_pdsh_or_mpich_runner_saves_on_both_nodes_and_leaves_no_process(
        netns_cluster, tmp_path, launcher, source, runner_alone, extra):
    """pdsh sshes from this machine to node1 and node2, each starts deepspeed's per-node launcher
    with its node rank; MPICH's mpiexec starts its Hydra proxy on each node over ssh, which starts
    the rank. No interface is named: gloo finds each node's address from its host name. An ssh
    session carries no signal to the remote side, so the supervisor reaches the nodes over pdsh
    itself: every rank saves at the agreed step, the run exits 75 within a bounded time, and
    nothing of the run is left in either node. The launchers' info lines are left out.

    The pdsh runner started by hand, without the supervisor, and sent SIGTERM itself: its handler
    runs `pkill` over the hosts, each node's launch.py passes SIGTERM to its rank, and the ranks
    agree on a step and save it, though their output no longer reaches anyone."""
    run = interrupt_two_node_run(tmp_path, launcher, signal.SIGTERM, runner_alone, **netns_cluster, **extra)
    records = check_saved_and_gone(run, source, runner_alone)
    assert {r["master_addr"] for r in records} == {"node1"}, records
    if not runner_alone:
        assert not [line for line in run.output.splitlines() if any(s in line for s in LAUNCHER_INFO)], \
            run.output[-4000:]


def step_of_metrics(run_dir: Path) -> int:
    return max((r["step"] for r in train_records(run_dir)), default=0)


def openmpi_over_ssh(openmpi_env: dict, netns_cluster: dict) -> dict:
    """Open MPI's daemons start on the nodes through ssh: they find Open MPI under --prefix."""
    return {**netns_cluster, **openmpi_env}


# The nodes' ssh sessions do not have the venv's Open MPI on PATH.
OPENMPI_ACROSS_NODES = f"--prefix {OPENMPI_PREFIX}"


def test_ctrl_c_to_the_openmpi_runner_saves_on_both_nodes_and_leaves_no_process(netns_cluster, openmpi_env, tmp_path):
    """deepspeed's openmpi runner: mpirun starts Open MPI's daemons on the nodes over ssh, and they
    the ranks, which get the run's tag with -x; the supervisor reaches them over pdsh as for the
    pdsh runner."""
    # --log_level info brings the runner's info lines back; its command line is checked in them.
    run = interrupt_two_node_run(tmp_path, "openmpi", signal.SIGINT, HP_SOCKET_IFNAME="eth0",
                                 HP_MPIRUN_ARGS=OPENMPI_ACROSS_NODES, HP_LAUNCHER_ARGS=f"{NO_SSH_CHECK} --log_level info",
                                 **openmpi_over_ssh(openmpi_env, netns_cluster))
    assert all(opt in run.output for opt in ("btl_tcp_if_include eth0", "-x HP_SOCKET_IFNAME", "-x PYTHON_HP_RUN")), \
        run.output[-4000:]
    check_saved_and_gone(run, "mpi")


def test_mpirun_script_across_two_nodes(netns_cluster, openmpi_env, tmp_path):
    run_dir = tmp_path / "run"
    args = f"{OPENMPI_ACROSS_NODES} --host node1,node2 -x PYTHONPATH -x HP_SOCKET_IFNAME"
    out = launch([str(REPO / "launch" / "mpirun.sh"), *workload_args(run_dir)], timeout=400,
                 HP_NPROCS="2", HP_MPIRUN_ARGS=args, HP_SOCKET_IFNAME="eth0",
                 PYTHON=sys.executable, **openmpi_over_ssh(openmpi_env, netns_cluster)).output
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    assert [(r["rank"], r["local_world_size"], r["source"]) for r in ranks] == [(0, 1, "mpi"), (1, 1, "mpi")], out[-4000:]
    # Rank 0 broadcast the address of its HP_SOCKET_IFNAME (node1's eth0), not its host name,
    # which resolves to loopback on every node.
    assert {r["master_addr"] for r in ranks} == {NODE_ADDR["node1"]}, ranks
