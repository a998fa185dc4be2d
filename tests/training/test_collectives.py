"""Every collective goes through launching/collectives.py, which puts its tensors on the backend's device.

The GPU rule (NCCL reduces only CUDA tensors of the rank's device) cannot be exercised on the
CPU, so the source tree is checked instead: no module but collectives.py may call a
torch.distributed (or deepspeed.comm) collective.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hp_deepspeed.launching import collectives

PACKAGE = Path(__file__).resolve().parents[2] / "hp_deepspeed"
OWNER = PACKAGE / "launching" / "collectives.py"
COLLECTIVES = {
    "barrier", "monitored_barrier", "all_reduce", "reduce", "broadcast", "broadcast_object_list",
    "all_gather", "all_gather_object", "all_gather_into_tensor", "gather", "gather_object",
    "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collective_calls(source: str) -> list[str]:
    """``name:line`` of each torch.distributed / deepspeed.comm collective used in ``source``."""
    tree = ast.parse(source)
    aliases: set[str] = set(COMM_MODULES)  # names bound to a communication module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name in COMM_MODULES and a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module in COMM_MODULES:
            found += [f"{a.name}:{node.lineno}" for a in node.names if a.name in COLLECTIVES]
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "deepspeed"):
            aliases.update(a.asname or a.name for a in node.names if a.name in ("distributed", "comm"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            if ast.unparse(node.value) in aliases:
                found.append(f"{node.attr}:{node.lineno}")
    return found


def test_no_module_but_collectives_calls_a_collective():
    # The benchmarks run on GPUs too (bench/gpu.py, checkpoint_io, hf_throughput): same rule.
    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "bench").rglob("*.py")]
    offenders = {
        str(path.relative_to(PACKAGE.parent)): calls
        for path in sorted(sources) if path != OWNER
        if (calls := direct_collective_calls(path.read_text()))
    }
    assert not offenders, f"call these through hp_deepspeed.launching.collectives instead: {offenders}"


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\ndist.all_reduce(t)",
    "import torch\ntorch.distributed.barrier()",
    "from torch.distributed import broadcast_object_list",
    "from torch import distributed as d\nd.all_gather_object(x, y)",
    "import deepspeed.comm as c\nc.barrier()",
])
def test_the_scan_sees_each_spelling(source):
    assert direct_collective_calls(source)


def test_device_per_backend(monkeypatch):
    assert collectives.device_for_backend("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.device_for_backend("nccl") == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collectives.comm_device() == torch.device("cuda", 3)


def test_nccl_collectives_are_handed_tensors_on_the_rank_device(monkeypatch):
    """What would crash on a GPU (a CPU tensor to NCCL) is caught here with a fake NCCL group."""
    seen = []

    class Handed(Exception):
        pass

    def record(device):
        seen.append(device)
        raise Handed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    # "meta" stands for the rank's CUDA device, which this machine lacks.
    monkeypatch.setattr(collectives, "device_for_backend",
                        lambda backend: torch.device("meta" if backend == "nccl" else "cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: record(t.device))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, device: record(device))
    for call in (lambda: collectives.all_reduce_flag(True, "min"), lambda: collectives.broadcast_object("x")):
        with pytest.raises(Handed):
            call()
    assert seen == [torch.device("meta")] * 2


def test_without_a_process_group_collectives_are_the_identity():
    t = torch.tensor([1.0, 2.0])
    out = collectives.all_reduce(t, "max")
    assert torch.equal(out, t) and out is not t
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    assert collectives.all_gather_objects(5) == [5]
    assert collectives.all_reduce_flag(True, "min") == 1
    collectives.barrier()


def test_one_rank_gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        t = torch.tensor([2.0])
        assert collectives.all_reduce(t, "sum").item() == 2.0 and t.item() == 2.0
        assert collectives.broadcast_object([1, "x"]) == [1, "x"]
        assert collectives.all_gather_objects("r0") == ["r0"]
        collectives.barrier()
    finally:
        dist.destroy_process_group()


def test_the_projects_own_gloo_groups_are_bounded_by_hp_dist_timeout(monkeypatch):
    from datetime import timedelta

    made = []
    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(collectives, "_gloo_groups", {})
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs) or object())
    monkeypatch.setenv("HP_DIST_TIMEOUT", "123")
    group = collectives.background_group()
    assert collectives.background_group() is group  # created once, then looked up
    assert made == [{"backend": "gloo", "timeout": timedelta(seconds=123)}]
    collectives.forget_groups()
    assert collectives.background_group() is not group and len(made) == 2
