"""The network interface the rendezvous goes over, checked before the process group starts.

Owns: probing this host's interfaces (:class:`NetworkView`), the interface variables to export
(:func:`socket_ifname_env`) and how rank 0 of an MPI job names itself (:func:`advertised_host`).
Does not own: where the rank sits in the job (``environment.py``) or starting the group
(``startup.py``).

Gloo advertises to the other ranks the address of the interface named by GLOO_SOCKET_IFNAME, or
else the address its host name resolves to; NCCL's bootstrap uses NCCL_SOCKET_IFNAME or else
any interface but ``lo``/``docker*``. On a node whose host name maps to 127.0.0.1, or whose
first interface is not the one between the nodes, a multi-node job then hangs in the
rendezvous. ``HP_SOCKET_IFNAME=ib0`` names the interface for both (it fills GLOO_SOCKET_IFNAME
and NCCL_SOCKET_IFNAME where they are not set). Before the process group exists every rank
checks the names it was given: an interface this host does not have, one without an IPv4
address, or ``lo`` in a job over several nodes is a ``LaunchEnvironmentError`` listing the
host's interfaces and the one that reaches MASTER_ADDR. With no name given in a multi-node job
on a host whose name resolves to loopback, gloo is told the interface of the route to
MASTER_ADDR, and the rank says so in one line.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass
from typing import Mapping, Protocol

from hp_deepspeed.errors import LaunchEnvironmentError

# The variables naming the interface of the rendezvous: ours, then each backend's own.
HP_IFNAME_VAR = "HP_SOCKET_IFNAME"
BACKEND_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915


class JobPlace(Protocol):
    """What the interface rules read of an ``environment.DistInfo`` (which imports this module)."""

    world_size: int
    local_world_size: int
    master_addr: str
    source: str


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


def _interface_error(var: str, name: str, problem: str, info: JobPlace, net: NetworkView) -> LaunchEnvironmentError:
    have = ", ".join(f"{n} {a}" for n, a in net.interfaces.items()) or "none with IPv4"
    route = net.route_interface()
    hint = f" (here: {route})" if route and not _is_loopback(net.route_source) else ""
    return LaunchEnvironmentError(
        f"{var}={name}: {problem} on {net.hostname} (its interfaces: {have}); set {HP_IFNAME_VAR} "
        f"to the interface that reaches MASTER_ADDR={info.master_addr}{hint}"
    )


def _check_interface(var: str, name: str, multi_node: bool, info: JobPlace, net: NetworkView) -> None:
    if name not in net.interfaces:
        raise _interface_error(var, name, "no such interface with an IPv4 address", info, net)
    if multi_node and _is_loopback(net.interfaces[name]) and not _is_loopback(net.master_ip):
        nodes = info.world_size // info.local_world_size
        raise _interface_error(
            var, name, f"a loopback interface, which the other nodes of this {nodes}-node job cannot reach",
            info, net)


def socket_ifname_env(info: JobPlace, env: Mapping[str, str], net: NetworkView) -> dict[str, str]:
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

