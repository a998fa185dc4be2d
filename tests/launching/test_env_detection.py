"""init_distributed's environment readers, on fake environments of each launcher (processes
only where mpi4py has to be imported afresh)."""

import subprocess
import sys

import pytest

from hp_deepspeed.launching.distributed import (
    DistInfo,
    LaunchEnvironmentError,
    detect_source,
    expand_hostlist,
    expand_tasks_per_node,
    info_from_mpi,
    info_from_torch_env,
    resolve,
    select_mpi4py_abi,
    slurm_port,
)

# What `deepspeed --num_gpus 8` on node 1 of 2 gives rank 11 (deepspeed/launcher/launch.py).
DEEPSPEED_ENV = {
    "RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_SIZE": "8", "CROSS_RANK": "1",
    "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
}
TORCHRUN_ENV = {
    "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
    "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none",
}
# Task 6 of `srun --nodes=2 --ntasks-per-node=4` inside job 123456 on gpu[07-08].
SRUN_ENV = {
    "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_deepspeed_launcher_env():
    info = info_from_torch_env(DEEPSPEED_ENV)
    assert info == DistInfo(11, 3, 16, 8, "10.0.0.1", 29500, "deepspeed")
    assert resolve(DEEPSPEED_ENV) == info
    assert info.torch_env()["LOCAL_WORLD_SIZE"] == "8"


def test_torchrun_env():
    assert resolve(TORCHRUN_ENV) == DistInfo(5, 1, 8, 4, "node0", 29400, "torchrun")


def test_launcher_under_srun_wins_over_slurm_variables():
    # `srun --ntasks-per-node=1 torchrun ...`: the ranks see both; torchrun's numbering counts.
    env = {**SRUN_ENV, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", **TORCHRUN_ENV}
    assert resolve(env).source == "torchrun"


@pytest.mark.parametrize("drop", ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE"])
def test_incomplete_torch_env_is_an_error(drop):
    env = {k: v for k, v in DEEPSPEED_ENV.items() if k != drop}
    with pytest.raises(LaunchEnvironmentError, match=drop.replace("LOCAL_SIZE", "LOCAL_WORLD_SIZE")):
        resolve(env)


def test_rank_outside_world_is_an_error():
    with pytest.raises(LaunchEnvironmentError, match="rank 16 not in"):
        resolve({**DEEPSPEED_ENV, "RANK": "16"})
    with pytest.raises(LaunchEnvironmentError, match="not an integer"):
        resolve({**DEEPSPEED_ENV, "RANK": "three"})


def test_srun_task_env():
    calls = []

    def hostnames(nodelist):
        calls.append(nodelist)
        return expand_hostlist(nodelist)

    info = resolve(SRUN_ENV, hostnames=hostnames)
    assert info == DistInfo(6, 2, 8, 4, "gpu07", slurm_port(123456), "slurm")
    assert calls == ["gpu[07-08]"]
    assert 15000 <= info.master_port < 35000


def test_srun_uses_exported_master_and_uneven_nodes():
    env = {**SRUN_ENV, "MASTER_ADDR": "ib-gpu07", "MASTER_PORT": "23456",
           "SLURM_STEP_TASKS_PER_NODE": "4,2", "SLURM_STEP_NUM_TASKS": "6", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1"}
    assert resolve(env, hostnames=lambda _: pytest.fail("no lookup needed")) == DistInfo(
        5, 1, 6, 2, "ib-gpu07", 23456, "slurm")


def test_batch_step_with_many_tasks_but_no_srun_is_an_error():
    batch = {k: v for k, v in SRUN_ENV.items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(LaunchEnvironmentError, match="not in an srun step"):
        detect_source(batch)
    # One task in the allocation and no srun: a plain single process.
    assert detect_source({**batch, "SLURM_NTASKS": "1"}) == "single"


@pytest.mark.parametrize("hostlist, expected", [
    ("node1", ["node1"]),
    ("gpu[07-09,11]", ["gpu07", "gpu08", "gpu09", "gpu11"]),
    ("a[1-2],b-login,c[009-010]", ["a1", "a2", "b-login", "c009", "c010"]),
    ("r[1-2]n[0-1]", ["r1n0", "r1n1", "r2n0", "r2n1"]),
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(LaunchEnvironmentError):
        expand_tasks_per_node("two")


class FakeComm:
    """COMM_WORLD as seen by one rank; bcast returns what rank 0 sent (``root_value``)."""

    def __init__(self, rank, size, local_rank, local_size, root_value=None):
        self.rank, self.size = rank, size
        self.local = (local_rank, local_size)
        self.root_value = root_value
        self.split_types = []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, split_type, key=0):
        self.split_types.append(split_type)
        return FakeComm(*self.local, *self.local)

    def bcast(self, obj, root=0):
        assert root == 0
        if self.rank == 0:
            self.root_value = obj
        return self.root_value


def test_mpi_rank0_chooses_and_broadcasts_master():
    comm = FakeComm(0, 4, 0, 2)
    info = info_from_mpi(comm, {"PMI_SIZE": "4"}, shared_type=7, hostname=lambda: "n0",
                         free_port=lambda: 41234)
    assert info == DistInfo(0, 0, 4, 2, "n0", 41234, "mpi")
    assert comm.split_types == [7] and comm.root_value == ("n0", 41234)


def test_mpi_other_ranks_take_rank0s_choice():
    comm = FakeComm(3, 4, 1, 2, root_value=("n0", 41234))
    info = info_from_mpi(comm, {}, shared_type=7, hostname=lambda: "n1",
                         free_port=lambda: pytest.fail("only rank 0 picks the port"))
    assert info == DistInfo(3, 1, 4, 2, "n0", 41234, "mpi")


def test_mpi_rank0_honours_exported_master():
    comm = FakeComm(0, 2, 0, 2)
    info = info_from_mpi(comm, {"MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29999"}, shared_type=7)
    assert (info.master_addr, info.master_port) == ("10.1.1.1", 29999)


@pytest.mark.parametrize("marker", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE",
                                    "MPI_LOCALNRANKS"])
def test_mpirun_markers_select_mpi(marker):
    assert detect_source({marker: "2"}) == "mpi"
    # mpirun inside a SLURM allocation (Open MPI starts its daemons with srun): MPI counts.
    assert detect_source({**SRUN_ENV, marker: "2"}) == "mpi"


def test_no_launcher_is_a_single_process():
    info = resolve({})
    assert (info.rank, info.world_size, info.local_world_size, info.source) == (0, 1, 1, "single")
    assert resolve({"MASTER_PORT": "1234"}).master_port == 1234


def test_no_launcher_can_be_required():
    with pytest.raises(LaunchEnvironmentError, match="HP_REQUIRE_LAUNCHER"):
        resolve({"HP_REQUIRE_LAUNCHER": "1"})


def test_forced_source():
    assert resolve({**SRUN_ENV, "HP_DIST_SOURCE": "single"}).source == "single"
    with pytest.raises(LaunchEnvironmentError, match="HP_DIST_SOURCE"):
        detect_source({"HP_DIST_SOURCE": "pbs"})


def _resolve_in_subprocess(**extra: str) -> subprocess.CompletedProcess:
    from tests.launching.conftest import clean_env

    return subprocess.run(
        [sys.executable, "-c", "from hp_deepspeed.launching.distributed import resolve; resolve()"],
        env=clean_env(**extra), capture_output=True, text=True, timeout=120)


def test_mpi4py_of_another_mpi_is_reported():
    """A rank started by a foreign mpirun (here: faked MVAPICH variables) whose mpi4py sees a
    world of 1 gets an error naming the mismatch, not a silent one-rank run."""
    pytest.importorskip("mpi4py")
    proc = _resolve_in_subprocess(MV2_COMM_WORLD_SIZE="2", MV2_COMM_WORLD_RANK="0")
    assert proc.returncode != 0
    assert "mpirun started 2 ranks but mpi4py sees a world of 1" in proc.stderr, proc.stderr[-2000:]
    assert "MPI4PY_LIBMPI" in proc.stderr


def test_open_mpi_ranks_ask_mpi4py_for_its_abi():
    assert select_mpi4py_abi({"OMPI_COMM_WORLD_SIZE": "2"}) == {"MPI4PY_MPIABI": "openmpi"}
    # The user's own choice stands; other MPIs are left to mpi4py's own detection.
    assert select_mpi4py_abi({"OMPI_COMM_WORLD_SIZE": "2", "MPI4PY_LIBMPI": "/x/libmpi.so"}) == {}
    assert select_mpi4py_abi({"OMPI_COMM_WORLD_SIZE": "2", "MPI4PY_MPIABI": "mpich"}) == {}
    assert select_mpi4py_abi({"PMI_SIZE": "2"}) == {}


def test_open_mpi_library_missing_is_reported():
    """Open MPI variables but no Open MPI library where mpi4py looks (faked: no mpirun put its
    lib directory on LD_LIBRARY_PATH): the error says which library and how to point at it."""
    pytest.importorskip("mpi4py")
    proc = _resolve_in_subprocess(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0",
                                  LD_LIBRARY_PATH="")
    assert proc.returncode != 0
    assert "mpi4py cannot load the openmpi MPI library" in proc.stderr, proc.stderr[-2000:]
    assert "LD_LIBRARY_PATH" in proc.stderr and "MPI4PY_LIBMPI" in proc.stderr
