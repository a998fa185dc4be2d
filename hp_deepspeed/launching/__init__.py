"""Starting hp-deepspeed under deepspeed, torchrun, SLURM (srun) or MPI; see distributed.py."""

from hp_deepspeed.launching.distributed import (
    DistInfo,
    LaunchEnvironmentError,
    init_distributed,
    resolve,
)

__all__ = ["DistInfo", "LaunchEnvironmentError", "init_distributed", "resolve"]
