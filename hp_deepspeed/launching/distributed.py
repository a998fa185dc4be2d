"""``hp_deepspeed.launching.distributed``: the launching package's public names in one import.

A facade, kept so that ``from hp_deepspeed.launching.distributed import init_distributed`` (the
launch scripts' and the tests' spelling) keeps working. It owns nothing; the code lives in:

``environment.py``  where this process sits in the job, from any launcher's environment;
``network.py``      the interface the rendezvous goes over, checked before the group starts;
``startup.py``      ``init_distributed``, the collective timeout, naming a lost peer;
``shutdown.py``     ``shutdown_distributed``, the clean exit.
"""

from hp_deepspeed.errors import LaunchEnvironmentError
from hp_deepspeed.launching.environment import (
    MPI_MARKERS,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    SOURCES,
    Comm,
    DistInfo,
    detect_source,
    expand_hostlist,
    expand_tasks_per_node,
    in_srun_step,
    info_from_mpi,
    info_from_slurm,
    info_from_torch_env,
    resolve,
    scontrol_hostnames,
    select_mpi4py_abi,
    slurm_port,
)
from hp_deepspeed.launching.network import (
    BACKEND_IFNAME_VARS,
    HP_IFNAME_VAR,
    NetworkView,
    advertised_host,
    interface_addresses,
    route_source,
    socket_ifname_env,
)
from hp_deepspeed.launching.shutdown import shutdown_distributed
from hp_deepspeed.launching.startup import (
    DEFAULT_TIMEOUT_S,
    collective_timeout,
    default_backend,
    describe_lost_peer,
    init_distributed,
)

__all__ = [
    "BACKEND_IFNAME_VARS", "Comm", "DEFAULT_TIMEOUT_S", "DistInfo", "HP_IFNAME_VAR",
    "LaunchEnvironmentError", "MPI_MARKERS", "NetworkView", "SLURM_PORT_BASE", "SLURM_PORT_SPAN",
    "SOURCES", "advertised_host", "collective_timeout", "default_backend", "describe_lost_peer",
    "detect_source", "expand_hostlist", "expand_tasks_per_node", "in_srun_step", "info_from_mpi",
    "info_from_slurm", "info_from_torch_env", "init_distributed", "interface_addresses", "resolve",
    "route_source", "scontrol_hostnames", "select_mpi4py_abi", "shutdown_distributed",
    "slurm_port", "socket_ifname_env",
]
