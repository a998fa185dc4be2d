"""Where this process sits in the job, read from whichever launcher started it.

Owns: :class:`DistInfo` and the pure ``info_from_*`` readers of each launcher's environment
(a mapping, and for MPI a communicator), :func:`resolve`, which picks the source, and
:func:`collective_timeout` (``HP_DIST_TIMEOUT``), shared by the world and the project's own
groups. Does not own: the network interface (``network.py``), starting the process group
(``startup.py``), or tearing it down (``shutdown.py``).

Sources, tried in this order (the first that applies wins):

``env``/``deepspeed``/``torchrun``
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT already set: the deepspeed launcher (all of its
    runners: local, pdsh, mpich; it also sets LOCAL_SIZE), torchrun (TORCHELASTIC_RUN_ID), or
    anything else that speaks torch.distributed's env:// protocol. Checked first, because a
    launcher started under srun or mpirun inherits their variables too.
``mpi``
    Started by mpirun/mpiexec (OMPI_COMM_WORLD_SIZE, PMI_SIZE, MV2_COMM_WORLD_SIZE or
    MPI_LOCALNRANKS in the environment). mpi4py gives rank and size from COMM_WORLD, the local
    rank from ``Split_type(COMM_TYPE_SHARED)``; rank 0 picks the master address (its host name,
    or MASTER_ADDR if set) and a free port (or MASTER_PORT) and broadcasts both. Under Open
    MPI, mpi4py is told to load Open MPI's library (:func:`select_mpi4py_abi`).
``slurm``
    A task of an ``srun`` step (SLURM_STEP_NUM_TASKS set): SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_LOCALID, the local task count from SLURM_STEP_TASKS_PER_NODE; the master is the first
    host of the step's node list (``scontrol show hostnames``, or a built-in parser when
    scontrol is missing) unless MASTER_ADDR is set, and the port is MASTER_PORT or derived from
    SLURM_JOB_ID (the same on every node, different for concurrent jobs).
``single``
    None of the above: one process, world size 1, on 127.0.0.1. A plain
    ``python -m hp_deepspeed.cli train ...`` therefore just works for debugging. Set
    ``HP_REQUIRE_LAUNCHER=1`` to make this case an error instead.

A partial or inconsistent environment (RANK without MASTER_ADDR, rank >= world size, several
SLURM tasks but no srun step, ...) is a ``LaunchEnvironmentError`` naming what is missing,
never a silent single-process run. ``HP_DIST_SOURCE=env|mpi|slurm|single`` forces a source.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable, Mapping, Protocol

from hp_deepspeed.errors import LaunchEnvironmentError
from hp_deepspeed.launching.network import advertised_host

DEFAULT_TIMEOUT_S = 1800.0


def collective_timeout(env: Mapping[str, str]) -> timedelta:
    """HP_DIST_TIMEOUT seconds (default :data:`DEFAULT_TIMEOUT_S`): the longest any collective
    may wait for a peer before it fails."""
    raw = env.get("HP_DIST_TIMEOUT") or str(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LaunchEnvironmentError(f"HP_DIST_TIMEOUT={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


SOURCES = ("env", "mpi", "slurm", "single")
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
# Ports derived from a SLURM job id fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN).
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job, and how it found out (``source``)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchEnvironmentError(f"{self.source}: rank {self.rank} not in [0, {self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchEnvironmentError(
                f"{self.source}: local rank {self.local_rank} not in [0, {self.local_world_size})"
            )
        if self.local_world_size > self.world_size:
            raise LaunchEnvironmentError(
                f"{self.source}: local world size {self.local_world_size} > world size {self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            raise LaunchEnvironmentError(f"{self.source}: master port {self.master_port} out of range")

    def torch_env(self) -> dict[str, str]:
        """The env:// variables torch.distributed and deepspeed read."""
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        }

    def as_dict(self) -> dict:
        return asdict(self)


def _int(env: Mapping[str, str], key: str, source: str) -> int:
    value = env.get(key)
    if value is None or value == "":
        raise LaunchEnvironmentError(f"{source}: {key} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvironmentError(f"{source}: {key}={value!r} is not an integer") from None


# ----------------------------------------------------------------------------- env:// launchers

def info_from_torch_env(env: Mapping[str, str]) -> DistInfo:
    """deepspeed launcher, torchrun, or any env:// launcher."""
    if "TORCHELASTIC_RUN_ID" in env:
        source = "torchrun"
    elif "LOCAL_SIZE" in env or "CROSS_RANK" in env:
        source = "deepspeed"
    else:
        source = "env"
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in required if not env.get(k)]
    if missing:
        raise LaunchEnvironmentError(
            f"{source}: RANK is set but {', '.join(missing)} is not: incomplete torch.distributed "
            "environment (launch with deepspeed, torchrun, srun or mpirun; see launch/)"
        )
    world_size = _int(env, "WORLD_SIZE", source)
    if env.get("LOCAL_RANK"):
        local_rank = _int(env, "LOCAL_RANK", source)
    elif world_size == 1:
        local_rank = 0
    else:
        raise LaunchEnvironmentError(f"{source}: LOCAL_RANK is not set in a {world_size}-rank job")
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key):
            local_world_size = _int(env, key, source)
            break
    else:
        if world_size != 1:
            raise LaunchEnvironmentError(
                f"{source}: neither LOCAL_WORLD_SIZE nor LOCAL_SIZE is set in a {world_size}-rank job"
            )
        local_world_size = 1
    return DistInfo(
        rank=_int(env, "RANK", source), local_rank=local_rank, world_size=world_size,
        local_world_size=local_world_size, master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT", source), source=source,
    )


# ----------------------------------------------------------------------------- SLURM

def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list: ``"gpu[01-03,07],login-a"`` -> gpu01, gpu02, gpu03, gpu07, login-a.

    Handles several bracket groups per name (``r[1-2]n[1-2]``) and zero padding, like
    ``scontrol show hostnames``.
    """
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", hostlist):
        parts = re.split(r"(\[[^\]]*\])", item)
        expanded = [""]
        for part in parts:
            if part.startswith("["):
                choices = []
                for rng in part[1:-1].split(","):
                    lo, _, hi = rng.partition("-")
                    if not hi:
                        choices.append(lo)
                        continue
                    if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                        raise LaunchEnvironmentError(f"slurm: bad range {rng!r} in host list {hostlist!r}")
                    choices.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
                expanded = [prefix + c for prefix in expanded for c in choices]
            elif part:
                expanded = [prefix + part for prefix in expanded]
        hosts.extend(expanded)
    if not hosts:
        raise LaunchEnvironmentError(f"slurm: empty host list {hostlist!r}")
    return hosts


def scontrol_hostnames(hostlist: str) -> list[str]:
    """``scontrol show hostnames``, falling back to :func:`expand_hostlist` without scontrol."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", hostlist], check=True, capture_output=True,
                text=True, timeout=30,
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(hostlist)


def expand_tasks_per_node(spec: str) -> list[int]:
    """``"2(x3),1"`` (SLURM_STEP_TASKS_PER_NODE) -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise LaunchEnvironmentError(f"slurm: cannot parse tasks per node {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_port(job_id: int) -> int:
    """A port every task of a job derives alike, different for jobs running side by side."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def in_srun_step(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_STEP_NUM_TASKS")) and bool(env.get("SLURM_PROCID"))


def info_from_slurm(
    env: Mapping[str, str], hostnames: Callable[[str], list[str]] = scontrol_hostnames
) -> DistInfo:
    """A task of an srun step; ``hostnames`` expands a node list (scontrol by default)."""
    source = "slurm"
    world_size = _int(env, "SLURM_STEP_NUM_TASKS", source)
    node_id = _int(env, "SLURM_NODEID", source)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        raise LaunchEnvironmentError("slurm: SLURM_STEP_TASKS_PER_NODE is not set")
    per_node = expand_tasks_per_node(spec)
    if node_id >= len(per_node):
        raise LaunchEnvironmentError(f"slurm: SLURM_NODEID={node_id} but tasks per node is {spec!r}")
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchEnvironmentError("slurm: neither MASTER_ADDR nor SLURM_STEP_NODELIST is set")
        master_addr = hostnames(nodelist)[0]
    if env.get("MASTER_PORT"):
        master_port = _int(env, "MASTER_PORT", source)
    else:
        master_port = slurm_port(_int(env, "SLURM_JOB_ID", source))
    return DistInfo(
        rank=_int(env, "SLURM_PROCID", source), local_rank=_int(env, "SLURM_LOCALID", source),
        world_size=world_size, local_world_size=per_node[node_id], master_addr=master_addr,
        master_port=master_port, source=source,
    )


# ----------------------------------------------------------------------------- MPI

class Comm(Protocol):
    """The part of an mpi4py communicator used here (a fake one in the unit tests)."""

    def Get_rank(self) -> int: ...
    def Get_size(self) -> int: ...
    def bcast(self, obj, root: int = 0): ...
    def Split_type(self, split_type: int, key: int = 0) -> "Comm": ...


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def info_from_mpi(
    comm: Comm, env: Mapping[str, str], shared_type: int,
    hostname: Callable[[], str] = socket.gethostname, free_port: Callable[[], int] = _free_port,
) -> DistInfo:
    """Rank/size from ``comm``; master address and port chosen by rank 0 and broadcast.

    ``shared_type`` is ``MPI.COMM_TYPE_SHARED`` (a parameter so fakes need no mpi4py).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(shared_type, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    if hasattr(local, "Free"):
        local.Free()
    endpoint = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or hostname()
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
        endpoint = (addr, port)
    addr, port = comm.bcast(endpoint, root=0)
    return DistInfo(
        rank=rank, local_rank=local_rank, world_size=size, local_world_size=local_size,
        master_addr=addr, master_port=port, source="mpi",
    )


def select_mpi4py_abi(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that make mpi4py load the MPI library of the mpirun that started us.

    mpi4py's PyPI wheels carry one extension per MPI ABI (MPICH, Open MPI) and, unless told,
    pick the first ``libmpi`` on their search path: in a venv with pip's ``mpich`` that is
    MPICH even under Open MPI's mpirun, whose ranks would then not find each other. Open MPI
    marks its ranks with OMPI_COMM_WORLD_SIZE and puts its own lib directory on
    LD_LIBRARY_PATH, so asking for its ABI is enough. A choice the user made (MPI4PY_MPIABI or
    MPI4PY_LIBMPI) is kept, and an mpi4py built from source ignores the variable.
    """
    if env.get("OMPI_COMM_WORLD_SIZE") and not (env.get("MPI4PY_MPIABI") or env.get("MPI4PY_LIBMPI")):
        return {"MPI4PY_MPIABI": "openmpi"}
    return {}


def _mpi_info(env: Mapping[str, str]) -> DistInfo:
    abi = select_mpi4py_abi(env)
    os.environ.update(abi)  # read by mpi4py at import
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as err:
        if err.name != "mpi4py":
            raise
        raise LaunchEnvironmentError(
            "mpi: started by mpirun but mpi4py is not installed (pip install 'hp-deepspeed[mpi]')"
        ) from err
    except (ImportError, RuntimeError) as err:  # the extension, or mpi4py's ABI loader
        kind = f"the {abi['MPI4PY_MPIABI']} " if abi else "an "
        raise LaunchEnvironmentError(
            f"mpi: mpi4py cannot load {kind}MPI library ({(str(err) or repr(err)).splitlines()[-1]}); put the "
            "lib directory of the MPI that runs mpirun on LD_LIBRARY_PATH, or set MPI4PY_LIBMPI "
            "to its libmpi.so"
        ) from err
    info = info_from_mpi(MPI.COMM_WORLD, env, MPI.COMM_TYPE_SHARED, hostname=lambda: advertised_host(env))
    expected = next((env[k] for k in MPI_MARKERS[:3] if env.get(k)), None)
    if expected is not None and int(expected) != info.world_size:
        raise LaunchEnvironmentError(
            f"mpi: mpirun started {expected} ranks but mpi4py sees a world of {info.world_size}: "
            f"mpi4py uses {MPI.Get_library_version().splitlines()[0]!r}, not the MPI of this "
            "mpirun; set MPI4PY_LIBMPI to this MPI's libmpi.so, or install mpi4py against it"
        )
    return info


# ----------------------------------------------------------------------------- choosing

def detect_source(env: Mapping[str, str]) -> str:
    """Which launcher started us: one of :data:`SOURCES` (see the module docstring)."""
    forced = env.get("HP_DIST_SOURCE")
    if forced:
        if forced not in SOURCES:
            raise LaunchEnvironmentError(f"HP_DIST_SOURCE={forced!r}: expected one of {SOURCES}")
        return forced
    if any(env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return "env"
    if any(env.get(k) for k in MPI_MARKERS):
        return "mpi"
    if in_srun_step(env):
        return "slurm"
    ntasks = env.get("SLURM_NTASKS")
    if env.get("SLURM_JOB_ID") and ntasks and ntasks != "1":
        raise LaunchEnvironmentError(
            f"slurm: inside job {env['SLURM_JOB_ID']} with {ntasks} tasks but not in an srun step; "
            "start the trainer with srun (see slurm/train.sbatch), or with a launcher under srun"
        )
    if env.get("HP_REQUIRE_LAUNCHER", "0") not in ("", "0"):
        raise LaunchEnvironmentError(
            "no launcher environment found (deepspeed, torchrun, srun or mpirun) and "
            "HP_REQUIRE_LAUNCHER is set"
        )
    return "single"


def resolve(
    env: Mapping[str, str] | None = None,
    hostnames: Callable[[str], list[str]] = scontrol_hostnames,
) -> DistInfo:
    """This process's :class:`DistInfo`, from ``env`` (default ``os.environ``). No side effects
    except that the MPI source talks to the other ranks."""
    env = os.environ if env is None else env
    source = detect_source(env)
    if source == "env":
        return info_from_torch_env(env)
    if source == "mpi":
        return _mpi_info(env)
    if source == "slurm":
        return info_from_slurm(env, hostnames)
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _free_port()
    return DistInfo(0, 0, 1, 1, env.get("MASTER_ADDR") or "127.0.0.1", port, "single")
