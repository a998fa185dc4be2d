"""The rendezvous interface choice, the collective timeout and the naming of a lost peer
(hp_deepspeed.launching.distributed), on fake hosts: no process group, no network."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from hp_deepspeed.launching.distributed import (
    DistInfo,
    LaunchEnvironmentError,
    NetworkView,
    advertised_host,
    collective_timeout,
    describe_lost_peer,
    socket_ifname_env,
)

# Rank 1 of a two-node job, one rank per node, on a node like those of scripts/netns_cluster.sh.
TWO_NODES = DistInfo(rank=1, local_rank=0, world_size=2, local_world_size=1,
                     master_addr="node1", master_port=29500, source="slurm")
ONE_NODE = DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2,
                    master_addr="127.0.0.1", master_port=29500, source="env")


class FakeNet(NetworkView):
    """A host named ``vm`` with lo and eth0; whether its name resolves to loopback is given."""

    def __init__(self, name_is_loopback: bool = True, master_ip: str = "10.231.0.11",
                 route: str = "10.231.0.12"):
        super().__init__("vm", {"lo": "127.0.0.1", "eth0": "10.231.0.12"}, master_ip, route)
        object.__setattr__(self, "_loopback_name", name_is_loopback)

    def hostname_is_loopback(self) -> bool:
        return self._loopback_name


def test_hp_socket_ifname_fills_both_backends_unless_they_are_set():
    assert socket_ifname_env(TWO_NODES, {"HP_SOCKET_IFNAME": "eth0"}, FakeNet()) == {
        "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    env = {"HP_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "^docker"}
    assert socket_ifname_env(TWO_NODES, env, FakeNet()) == {"GLOO_SOCKET_IFNAME": "eth0"}


@pytest.mark.parametrize("var", ["HP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"])
def test_a_missing_interface_is_named_with_the_ones_that_exist(var):
    with pytest.raises(LaunchEnvironmentError) as err:
        socket_ifname_env(TWO_NODES, {var: "ib0"}, FakeNet())
    message = str(err.value)
    assert f"{var}=ib0: no such interface" in message and "on vm" in message
    assert "lo 127.0.0.1, eth0 10.231.0.12" in message
    assert "set HP_SOCKET_IFNAME to the interface that reaches MASTER_ADDR=node1 (here: eth0)" in message


def test_loopback_is_refused_across_nodes_and_allowed_on_one():
    with pytest.raises(LaunchEnvironmentError, match="GLOO_SOCKET_IFNAME=lo: a loopback interface, which "
                       "the other nodes of this 2-node job cannot reach"):
        socket_ifname_env(TWO_NODES, {"GLOO_SOCKET_IFNAME": "eth0,lo"}, FakeNet())
    assert socket_ifname_env(ONE_NODE, {"HP_SOCKET_IFNAME": "lo"}, FakeNet(master_ip="127.0.0.1")) == {
        "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    # "Nodes" that are addresses of one machine (a loopback master): the user's choice stands.
    assert socket_ifname_env(TWO_NODES, {"HP_SOCKET_IFNAME": "lo"}, FakeNet(master_ip="127.0.0.2")) != {}


def test_unset_on_a_host_whose_name_is_loopback_picks_the_route_to_the_master():
    assert socket_ifname_env(TWO_NODES, {}, FakeNet()) == {"GLOO_SOCKET_IFNAME": "eth0"}
    # A host name that resolves to a real address: gloo's own choice works, nothing is set.
    assert socket_ifname_env(TWO_NODES, {}, FakeNet(name_is_loopback=False)) == {}
    # One node, or a master on loopback: nothing to choose.
    assert socket_ifname_env(ONE_NODE, {}, FakeNet(master_ip="127.0.0.1")) == {}
    with pytest.raises(LaunchEnvironmentError, match="HP_SOCKET_IFNAME=: not set, the host name resolves "
                       "to loopback and no interface reaches MASTER_ADDR"):
        socket_ifname_env(TWO_NODES, {}, FakeNet(route="192.168.9.9"))


def test_collective_timeout():
    assert collective_timeout({}) == timedelta(seconds=1800)
    assert collective_timeout({"HP_DIST_TIMEOUT": "90"}) == timedelta(seconds=90)
    for bad in ("0", "-5", "ten"):
        with pytest.raises(LaunchEnvironmentError, match=f"HP_DIST_TIMEOUT='{bad}': expected a number"):
            collective_timeout({"HP_DIST_TIMEOUT": bad})


PEERS = [("node1", "10.231.0.11"), ("node2", "10.231.0.12"), ("node2", "10.231.0.12")]


def test_a_lost_peer_is_named_from_the_gloo_error():
    # gloo's words when the process at the other end of a pair is gone (SIGKILL, node down).
    err = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                       "[10.231.0.11]:15013: Connection reset by peer. This is typically caused by ...")
    assert describe_lost_peer(err, PEERS[:2], rank=1) == (
        "rank 1 lost rank 0 on node1 (10.231.0.11): its process or node is gone")
    closed = RuntimeError("Connection closed by peer [10.231.0.12]:40000")
    assert describe_lost_peer(closed, PEERS, rank=0) == (
        "rank 0 lost one of ranks 1, 2 on node2 (10.231.0.12): its process or node is gone")
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 90000ms for recv")
    assert "a collective timed out (HP_DIST_TIMEOUT)" in describe_lost_peer(timed_out, PEERS, rank=0)
    assert describe_lost_peer(RuntimeError("CUDA out of memory"), PEERS, rank=0) is None


def test_mpi_rank_0_advertises_the_named_interface_and_a_loopback_master_is_refused():
    assert advertised_host({"HP_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert advertised_host({}) == socket.gethostname()
    # Rank 0 advertised its host name, which resolves to loopback: the other hosts cannot use it.
    mpi = DistInfo(rank=1, local_rank=0, world_size=2, local_world_size=1, master_addr="vm",
                   master_port=29500, source="mpi")
    with pytest.raises(LaunchEnvironmentError, match="rank 0 advertised MASTER_ADDR=vm, a loopback "
                       "address, to ranks on other hosts"):
        socket_ifname_env(mpi, {}, FakeNet(master_ip="127.0.0.1"))
