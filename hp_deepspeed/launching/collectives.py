"""Every collective of the project, and the device that communication happens on.

NCCL only moves CUDA tensors of the rank's own device and gloo only CPU tensors, so a collective
called with a tensor built "wherever" works on the CPU test suite and crashes on the first GPU
run (``No backend type associated with device type cpu``). This module is the one place that
knows the rule: :func:`comm_device` is ``cuda:<current>`` under NCCL and the CPU under any other
backend, and every helper below moves its tensor there and back. No other module of
``hp_deepspeed`` calls a ``torch.distributed`` collective (``tests/training/test_collectives.py``
checks the source tree), so the CPU suite guards the GPU rule.

Without an initialised process group every helper is the single-process identity, so callers
need no ``if dist.is_initialized()`` of their own.

:func:`background_group` is a second, gloo, group over the same ranks for collectives made from a
background thread (the asynchronous checkpoint save's agreement and commit). Two threads calling
collectives on one group would interleave their messages; on a group of their own they cannot.
The object helpers take it as ``group``; gloo moves CPU tensors only, so they then use the CPU.
:func:`start_flag_agreement` has a gloo group of its own too, so a per-step flag never waits for a GPU.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist

from hp_deepspeed.launching.environment import collective_timeout

ReduceOp = Literal["sum", "min", "max"]
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def is_distributed() -> bool:
    """Whether a process group is up (collectives then talk to the other ranks)."""
    return dist.is_available() and dist.is_initialized()


def device_for_backend(backend: str) -> torch.device:
    """Where tensors handed to ``backend`` must live: the rank's CUDA device for NCCL, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device() -> torch.device:
    """The device of this process's collectives (the CPU when no process group is up)."""
    if not is_distributed():
        return torch.device("cpu")
    return device_for_backend(dist.get_backend())


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """All ranks wait here. Under NCCL on the rank's own device, so no rank touches GPU 0."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """The reduction of ``tensor`` over ranks, as a new tensor on ``tensor``'s device and dtype.

    The input is not modified (it is copied to the communication device even where it already
    lives there), so a caller may reduce a tensor it still uses.
    """
    if not is_distributed():
        return tensor.clone()
    buffer = tensor.detach().to(comm_device(), copy=True)
    dist.all_reduce(buffer, op=_OPS[op])
    return buffer.to(tensor.device)


def all_reduce_flag(value: bool | int, op: ReduceOp) -> int:
    """A small integer agreed over ranks (``min``: all true, ``max``: any true)."""
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.int32), op).item())


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (of ``group``: one of :func:`background_group`)."""
    if not is_distributed():
        return obj
    box = [obj]
    if group is None:
        dist.broadcast_object_list(box, src=src, device=comm_device())
    else:
        dist.broadcast_object_list(box, src=src, group=group, device=torch.device("cpu"))
    return box[0]


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (of ``group``: one of :func:`background_group`)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    # all_gather_object has no device argument: it uses the current CUDA device under NCCL,
    # which init_distributed sets to this rank's device (see launching/distributed.py), and the
    # CPU on a gloo group.
    if group is None:
        dist.all_gather_object(gathered, obj)
    else:
        dist.all_gather_object(gathered, obj, group=group)
    return gathered


_gloo_groups: dict[tuple[int, str], Any] = {}


def _gloo_group(purpose: str) -> Any:
    """A gloo group over every rank, one per ``purpose`` (None without a process group).
    Collective the first time per process group: every rank must ask at the same point of its
    program, as for any collective."""
    if not is_distributed():
        return None
    world = id(dist.group.WORLD)  # a process group destroyed and created again gets its own
    if (world, purpose) not in _gloo_groups:
        for key in [key for key in _gloo_groups if key[0] != world]:
            del _gloo_groups[key]
        # A new group does not inherit the world's timeout: give it the same bound (HP_DIST_TIMEOUT).
        _gloo_groups[world, purpose] = dist.new_group(backend="gloo", timeout=collective_timeout(os.environ))
    return _gloo_groups[world, purpose]


def forget_groups() -> None:
    """Drop this module's references to its gloo groups (after ``destroy_process_group``): a
    group's threads end only when its last reference goes (``launching/shutdown.py``)."""
    _gloo_groups.clear()


def background_group() -> Any:
    """The gloo group for a background thread's collectives (None without a process group)."""
    return _gloo_group("background")


def start_flag_agreement(value: bool | int, op: ReduceOp) -> Callable[[], int]:
    """Start agreeing on a small integer over ranks; the returned function waits for the result.

    For a flag checked every step (preemption): the reduction runs in host memory on a gloo
    group of its own while the caller goes on, so neither the host nor a GPU stream waits for a
    step to finish, and read one step later the result has long arrived. Every rank must start,
    and read, its agreements in the same order. Without a process group, or alone, it is ``value``.
    """
    if world_size() == 1:
        result = int(value)
        return lambda: result
    flag = torch.tensor([int(value)], dtype=torch.int32)
    work = dist.all_reduce(flag, op=_OPS[op], group=_gloo_group("control"), async_op=True)

    def result() -> int:
        work.wait()
        return int(flag[0])

    return result
