"""Tearing the process group down at a clean exit of a command: ``shutdown_distributed()``.

Owns: the order of the exit (engines, groups, what still holds them, DeepSpeed's shared-memory
file). Does not own: the library-specific clean-ups themselves, which are workarounds of
DeepSpeed and torch behaviours and live in ``hp_deepspeed/compat/``; nor start-up
(``startup.py``).
"""

from __future__ import annotations

from hp_deepspeed.compat.deepspeed import destroy_engines, release_group_holders, remove_cpu_allreduce_buffer
from hp_deepspeed.launching import collectives


def shutdown_distributed() -> None:
    """Destroy every process group at a clean exit of a command, and let go of everything that
    still holds one; a no-op when none exists.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they use: the
    process then aborts after its work is done ("terminate called without an active exception",
    exit -6), which the launcher reports as a failed job. ``destroy_process_group`` alone does not
    stop those threads while anything still holds a group: a group's threads end when its last
    reference goes. So the DeepSpeed engines still alive are destroyed, and after the groups the
    process-wide references that would outlive them are dropped; a test checks that no gloo or
    TCP-store thread is left (tests/launching/test_shutdown.py). NCCL asks for the same at exit.
    Only at a clean exit: after an error a peer may still be inside a collective, and destroying
    the group there can hang instead of failing.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        destroy_engines()  # needs the groups: DeepSpeed logs by rank while it does
        dist.destroy_process_group()
        collectives.forget_groups()  # the project's own gloo groups, destroyed with the rest
        release_group_holders()
        remove_cpu_allreduce_buffer(rank)
