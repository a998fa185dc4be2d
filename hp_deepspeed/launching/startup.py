"""Starting the process group: ``init_distributed()``, the first thing the trainer calls.

Owns: the order of start-up (resolve the launcher environment, choose the device, check the
network interface, export the torch.distributed variables, call ``deepspeed.init_distributed``
with nccl on CUDA and gloo on the CPU) and the table of peers that names a lost rank. Does not
own: reading the launcher's environment and the collective timeout's variable
(``environment.py``), the interface rules (``network.py``), the device rule (``device.py``) or
the exit (``shutdown.py``).

``HP_DIST_BACKEND`` forces the backend; ``HP_DEVICE=cpu`` selects gloo even where CUDA exists.

Collective timeout: ``HP_DIST_TIMEOUT`` seconds (default 1800) bounds every collective, so a rank
whose peer died never waits forever. A collective that fails because a peer went away is
explained by :func:`describe_lost_peer`, which names the lost rank(s) and host from the table of
ranks, hosts and addresses every rank shares right after the process group starts.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from datetime import timedelta
from typing import Mapping

from hp_deepspeed.compat.deepspeed import export_device_index
from hp_deepspeed.errors import LaunchEnvironmentError
from hp_deepspeed.launching.environment import DEFAULT_TIMEOUT_S, DistInfo, collective_timeout, resolve
from hp_deepspeed.launching.network import HP_IFNAME_VAR, NetworkView, socket_ifname_env

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
        # mpi4py has read OMPI_COMM_WORLD_LOCAL_RANK already; nothing of ours reads it after this.
        export_device_index(index)
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, distributed_port=info.master_port,
        verbose=verbose, rank=info.rank, world_size=info.world_size, timeout=timeout,
    )
    _share_peer_table(info, net, os.environ.get("GLOO_SOCKET_IFNAME"))
    return info


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
