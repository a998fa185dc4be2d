"""Starting hp-deepspeed under deepspeed, torchrun, SLURM (srun) or MPI, and ending it cleanly.

Read in this order: ``environment.py`` (where this process sits in the job, from any launcher),
``network.py`` (the interface the rendezvous goes over), ``device.py`` (one rank per GPU),
``startup.py`` (``init_distributed``), ``shutdown.py`` (``shutdown_distributed``),
``collectives.py`` (every collective of the project). ``distributed.py`` re-exports their
public names. DeepSpeed's and torch's quirks met on the way live in ``hp_deepspeed/compat/``.
"""

from hp_deepspeed.errors import LaunchEnvironmentError
from hp_deepspeed.launching.environment import DistInfo, resolve
from hp_deepspeed.launching.startup import init_distributed

__all__ = ["DistInfo", "LaunchEnvironmentError", "init_distributed", "resolve"]
