"""Distributed start-up from whichever launcher started this process.

``init_distributed()`` is the first thing the trainer calls. It works out this process's place
in the job from the environment of one of four launchers, exports the torch.distributed
variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and calls
``deepspeed.init_distributed`` with nccl on CUDA and gloo on the CPU.

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
``HP_DIST_BACKEND`` forces the backend; ``HP_DEVICE=cpu`` selects gloo even where CUDA exists.

Network interface (``socket_ifname_env``). Gloo advertises to the other ranks the address of the
interface named by GLOO_SOCKET_IFNAME, or else the address its host name resolves to; NCCL's
bootstrap uses NCCL_SOCKET_IFNAME or else any interface but ``lo``/``docker*``. On a node whose
host name maps to 127.0.0.1, or whose first interface is not the one between the nodes, a
multi-node job then hangs in the rendezvous. ``HP_SOCKET_IFNAME=ib0`` names the interface for
both (it fills GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME where they are not set). Before the
process group exists every rank checks the names it was given: an interface this host does not
have, one without an IPv4 address, or ``lo`` in a job over several nodes is a
``LaunchEnvironmentError`` listing the host's interfaces and the one that reaches MASTER_ADDR.
With no name given in a multi-node job on a host whose name resolves to loopback, gloo is told
the interface of the route to MASTER_ADDR, and the rank says so in one line.

Collective timeout: ``HP_DIST_TIMEOUT`` seconds (default 1800) bounds every collective, so a rank
whose peer died never waits forever. A collective that fails because a peer went away is
explained by :func:`describe_lost_peer`, which names the lost rank(s) and host from the table of
ranks, hosts and addresses every rank shares right after the process group starts.

The ``*_from_*`` functions are pure over a mapping (and, for MPI, a communicator), so each
launcher's environment is unit-testable without starting processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping, Protocol

from hp_deepspeed.launching.errors import LaunchEnvironmentError

SOURCES = ("env", "mpi", "slurm", "single")
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
# Ports derived from a SLURM job id fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN).
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
# The variables naming the interface of the rendezvous: ours, then each backend's own.
HP_IFNAME_VAR = "HP_SOCKET_IFNAME"
BACKEND_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
DEFAULT_TIMEOUT_S = 1800.0
_SIOCGIFADDR = 0x8915


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


# ----------------------------------------------------------------------------- network interface

def interface_addresses() -> dict[str, str]:
    """This host's interfaces that have an IPv4 address: name -> address."""
    found: dict[str, str] = {}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:  # no interface list here: nothing can be checked against it
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def _resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def route_source(addr: str) -> str | None:
    """The local address the kernel picks to reach ``addr`` (a UDP connect sends nothing)."""
    target = _resolve(addr)
    if target is None:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def _is_loopback(addr: str | None) -> bool:
    return bool(addr) and addr.startswith("127.")


@dataclass(frozen=True)
class NetworkView:
    """What this host looks like to the rendezvous (a fake one in the unit tests)."""

    hostname: str
    interfaces: Mapping[str, str]   # name -> IPv4 address
    master_ip: str | None           # MASTER_ADDR resolved; None when it does not resolve
    route_source: str | None        # local address that reaches MASTER_ADDR

    @classmethod
    def probe(cls, master_addr: str) -> "NetworkView":
        return cls(socket.gethostname(), interface_addresses(), _resolve(master_addr), route_source(master_addr))

    def route_interface(self) -> str | None:
        return next((n for n, a in self.interfaces.items() if a == self.route_source), None)

    def hostname_is_loopback(self) -> bool:
        return _is_loopback(_resolve(self.hostname))


def _interface_error(var: str, name: str, problem: str, info: DistInfo, net: NetworkView) -> LaunchEnvironmentError:
    have = ", ".join(f"{n} {a}" for n, a in net.interfaces.items()) or "none with IPv4"
    route = net.route_interface()
    hint = f" (here: {route})" if route and not _is_loopback(net.route_source) else ""
    return LaunchEnvironmentError(
        f"{var}={name}: {problem} on {net.hostname} (its interfaces: {have}); set {HP_IFNAME_VAR} "
        f"to the interface that reaches MASTER_ADDR={info.master_addr}{hint}"
    )


def _check_interface(var: str, name: str, multi_node: bool, info: DistInfo, net: NetworkView) -> None:
    if name not in net.interfaces:
        raise _interface_error(var, name, "no such interface with an IPv4 address", info, net)
    if multi_node and _is_loopback(net.interfaces[name]) and not _is_loopback(net.master_ip):
        nodes = info.world_size // info.local_world_size
        raise _interface_error(
            var, name, f"a loopback interface, which the other nodes of this {nodes}-node job cannot reach",
            info, net)


def socket_ifname_env(info: DistInfo, env: Mapping[str, str], net: NetworkView) -> dict[str, str]:
    """The interface variables to export before the process group starts (see the module
    docstring), or a ``LaunchEnvironmentError`` for an interface that cannot work."""
    multi_node = info.world_size > info.local_world_size
    chosen: dict[str, str] = {}
    if env.get(HP_IFNAME_VAR):
        _check_interface(HP_IFNAME_VAR, env[HP_IFNAME_VAR], multi_node, info, net)
        chosen = {var: env[HP_IFNAME_VAR] for var in BACKEND_IFNAME_VARS if not env.get(var)}
    gloo = env.get("GLOO_SOCKET_IFNAME")
    # NCCL_SOCKET_IFNAME is not checked: it takes prefixes and ^exclusions, not just names.
    for name in (gloo or "").split(","):
        if name:
            _check_interface("GLOO_SOCKET_IFNAME", name, multi_node, info, net)
    if multi_node and info.source == "mpi" and _is_loopback(net.master_ip):
        # MPI knows which ranks share a host: rank 0 advertised a name the others resolve to
        # themselves. (A hostfile of loopback "nodes" on one machine is left alone.)
        raise _interface_error(
            HP_IFNAME_VAR, env.get(HP_IFNAME_VAR, ""), f"rank 0 advertised MASTER_ADDR={info.master_addr}, "
            "a loopback address, to ranks on other hosts", info, net)
    if chosen or gloo or not multi_node or _is_loopback(net.master_ip):
        return chosen
    if not net.hostname_is_loopback():
        return {}
    route = net.route_interface()
    if route is None or _is_loopback(net.route_source):
        raise _interface_error(
            HP_IFNAME_VAR, "", "not set, the host name resolves to loopback and no interface reaches "
            "MASTER_ADDR", info, net)
    return {"GLOO_SOCKET_IFNAME": route}


def advertised_host(env: Mapping[str, str]) -> str:
    """How rank 0 of an MPI job names itself to the others: the address of the interface named
    by HP_SOCKET_IFNAME (or GLOO_SOCKET_IFNAME) when there is one, else its host name."""
    name = (env.get(HP_IFNAME_VAR) or env.get("GLOO_SOCKET_IFNAME") or "").split(",")[0]
    if not name:
        return socket.gethostname()
    return interface_addresses().get(name) or socket.gethostname()


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


# (host name, address) of every rank, by rank; filled by init_distributed.
_PEERS: list[tuple[str, str]] = []


def describe_lost_peer(err: BaseException, peers: list[tuple[str, str]] | None = None,
                       rank: int | None = None) -> str | None:
    """One line naming the rank(s) a failed collective lost, from the peer address in a gloo
    error or a timeout; None when ``err`` is not a lost peer."""
    peers = _PEERS if peers is None else peers
    if rank is None and os.environ.get("RANK", "").isdigit():
        rank = int(os.environ["RANK"])
    text = str(err)
    me = f"rank {rank}" if rank is not None else "this rank"
    found = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
    if found and re.search(r"reset by peer|closed by peer|Connection refused|Broken pipe|Read error|Write error", text):
        addr = found.group(1)
        ranks = [r for r, (_, a) in enumerate(peers) if a == addr and r != rank]
        if not ranks:
            return f"{me} lost a peer at {addr} (no rank of this job has that address)"
        host = peers[ranks[0]][0]
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"one of ranks {', '.join(map(str, ranks))}"
        return f"{me} lost {who} on {host} ({addr}): its process or node is gone"
    # gloo's and NCCL's watchdog's words for a collective that outlived the timeout.
    if re.search(r"Timed out waiting|Watchdog caught collective operation timeout", text):
        return f"{me}: a collective timed out (HP_DIST_TIMEOUT): a peer rank stopped answering"
    return None


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


def default_backend(env: Mapping[str, str] | None = None) -> str:
    """HP_DIST_BACKEND if set; gloo with HP_DEVICE=cpu or without CUDA; nccl otherwise."""
    env = os.environ if env is None else env
    if env.get("HP_DIST_BACKEND"):
        return env["HP_DIST_BACKEND"]
    if env.get("HP_DEVICE", "").lower() == "cpu":
        return "gloo"
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    backend: str | None = None, timeout: timedelta | None = None, verbose: bool = False
) -> DistInfo:
    """Resolve the launcher environment, check the network interface, export both, and
    initialise deepspeed's process group with a bounded collective timeout.

    Idempotent: when torch.distributed is already initialised only the information is returned.
    """
    import torch
    import torch.distributed as dist

    info = resolve()
    os.environ.update(info.torch_env())
    if dist.is_available() and dist.is_initialized():
        return info
    from hp_deepspeed.launching.device import cuda_device_index, prepare_process

    prepare_process()
    timeout = timeout or collective_timeout(os.environ)
    net = NetworkView.probe(info.master_addr)
    ifnames = socket_ifname_env(info, os.environ, net)
    if ifnames and not os.environ.get(HP_IFNAME_VAR):
        print(f"[hp-deepspeed] rank {info.rank} on {net.hostname}: {net.hostname} resolves to loopback; "
              f"using {ifnames} (the interface that reaches MASTER_ADDR={info.master_addr}); set "
              f"{HP_IFNAME_VAR} to choose another", file=sys.stderr, flush=True)
    os.environ.update(ifnames)
    backend = backend or default_backend()
    if backend == "nccl":
        index = cuda_device_index(info.local_rank, info.local_world_size, torch.cuda.device_count(),
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        # DeepSpeed takes cuda:LOCAL_RANK as the rank's device everywhere; it differs from the
        # node-local rank only for a rank bound to its own GPU, which is then index 0. Under
        # Open MPI the engine also asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK, so that one
        # follows (mpi4py has read it already; nothing else of ours reads it after this point).
        os.environ["LOCAL_RANK"] = str(index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
            os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, distributed_port=info.master_port,
        verbose=verbose, rank=info.rank, world_size=info.world_size, timeout=timeout,
    )
    _share_peer_table(info, net, os.environ.get("GLOO_SOCKET_IFNAME"))
    return info


def shutdown_distributed() -> None:
    """Destroy every process group at a clean exit of a command, and let go of everything that
    still holds one; a no-op when none exists.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they use: the
    process then aborts after its work is done ("terminate called without an active exception",
    exit -6), which the launcher reports as a failed job; CI saw it after a 2-rank run's final
    checkpoint, and again after a 2-rank resume. ``destroy_process_group`` alone does not stop
    those threads while anything still holds a group: a group's threads end when its last
    reference goes. So the DeepSpeed engines still alive are destroyed, and after the groups the
    process-wide references that would outlive them are dropped (``_release_group_holders``); a
    test checks that no gloo or TCP-store thread is left (tests/launching/test_shutdown.py).
    NCCL asks for the same at exit. Only at a clean exit: after an error a peer may still be
    inside a collective, and destroying the group there can hang instead of failing.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        _destroy_deepspeed_engines()  # needs the groups: DeepSpeed logs by rank while it does
        dist.destroy_process_group()
        _release_group_holders()
        # DeepSpeed 0.19.8 never unlinks its CPU all-reduce file (69 MB per rank, in RAM): every
        # CPU run left them in /dev/shm, 17 GB after a day of test suites on a 24 GB machine. The
        # peers mapped it at start-up, so removing the name takes nothing from them.
        cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def _destroy_deepspeed_engines() -> None:
    """``destroy()`` every DeepSpeed engine still alive in this process.

    An engine outlives its owner: its gradient hooks sit on autograd nodes (C++ references that
    Python's garbage collector cannot see through), and ZeRO-3 puts the model on a process-wide
    stack (``parameter_offload.FWD_MODULE_STACK``) that it never pops. The engine, its optimizer
    and every ZeRO-3 parameter (``ds_process_group``) hold process groups, so they would keep the
    groups' threads running to interpreter exit. ``destroy()`` removes the hooks."""
    import gc

    engine_class = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    if engine_class is None:  # DeepSpeed never imported: no engine exists
        return
    # By type, here and below: isinstance would read attributes of every object, and a few warn.
    for engine in [o for o in gc.get_objects() if issubclass(type(o), engine_class)]:
        try:
            engine.destroy()
        except Exception as err:  # the work is done and saved: a failed clean-up must not fail the command
            print(f"hp-deepspeed: warning: DeepSpeed engine clean-up at exit failed ({type(err).__name__}: {err})",
                  file=sys.stderr, flush=True)


def _release_group_holders() -> None:
    """Drop the process-wide references to process groups that outlive ``destroy_process_group``,
    then collect, so that the groups' threads end now rather than during interpreter exit.

    * ZeRO-3's stack of modules in forward keeps its top module (and so every parameter) forever;
    * ``deepspeed.utils.groups`` caches the groups DeepSpeed made (``_WORLD_GROUP`` and others);
    * DeepSpeed memoises some methods with ``functools.lru_cache`` on the class (ZeRO-3's
      ``PartitionedParameterCoordinator.__params_to_release``), which keeps every instance, and
      through it the engine's model and parameters, for the life of the process;
    * default arguments such as ``group=GroupMember.WORLD`` (``torch.distributed.nn.functional``,
      DeepSpeed's ``TorchBackend.barrier``) are bound when their module is imported; imported
      after the group exists (DeepSpeed imports lazily), they hold the world group. ``None``
      means the same there: the default group, whichever exists when the function is called.
    """
    import functools
    import gc
    import types

    import torch.distributed as dist

    # Looked up defensively: a DeepSpeed without these names must still exit cleanly (a holder a
    # new version adds is what the thread test in tests/launching/test_shutdown.py would catch).
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith("_GROUP") and value is not None:
                setattr(groups, name, {} if isinstance(value, dict) else None)

    def group(value) -> bool:
        return issubclass(type(value), dist.ProcessGroup)

    for obj in gc.get_objects():
        if type(obj) is functools._lru_cache_wrapper:
            if str(getattr(obj, "__module__", "")).startswith("deepspeed."):
                obj.cache_clear()
        elif type(obj) is types.FunctionType:
            if obj.__defaults__ and any(map(group, obj.__defaults__)):
                obj.__defaults__ = tuple(None if group(d) else d for d in obj.__defaults__)
            if obj.__kwdefaults__ and any(map(group, obj.__kwdefaults__.values())):
                obj.__kwdefaults__ = {k: None if group(d) else d for k, d in obj.__kwdefaults__.items()}
    gc.collect()


def cpu_allreduce_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce op creates for ``rank`` at start-up
    (``ops/csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``).
    """
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{rank}"
    return Path("/dev/shm") / name


def _share_peer_table(info: DistInfo, net: NetworkView, ifname: str | None) -> None:
    """Every rank learns every rank's host and address, so that a lost peer can be named
    (:func:`describe_lost_peer`). The one collective of this module, run once at start-up."""
    from hp_deepspeed.launching import collectives

    addr = net.interfaces.get((ifname or "").split(",")[0]) or net.route_source or "?"
    try:  # the name the other nodes know this address by, e.g. from /etc/hosts
        host = socket.gethostbyaddr(addr)[0]
    except OSError:
        host = net.hostname
    _PEERS[:] = [tuple(entry) for entry in collectives.all_gather_objects((host, addr))]
