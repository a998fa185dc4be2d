"""Which device a rank computes on, decided once, and told to DeepSpeed before it decides itself.

Three rules live here and nowhere else:

CPU or GPU (:func:`cpu_requested`, :func:`prepare_process`)
    ``HP_DEVICE=cpu``, ``HP_DIST_BACKEND=gloo`` or no visible GPU make a CPU run. DeepSpeed picks
    its accelerator once, when ``deepspeed`` is first imported, from ``DS_ACCELERATOR`` or else
    from ``torch.cuda``; a CPU run on a GPU host must therefore set ``DS_ACCELERATOR=cpu`` (and
    hide the GPUs) before that import, or DeepSpeed still places tensors on CUDA and JIT-builds
    FusedAdam. :func:`prepare_process` does it; the CLI calls it before importing anything heavy.
Which GPU (:func:`cuda_device_index`)
    One rank per GPU. A rank that sees at least as many GPUs as its node has ranks uses GPU
    ``LOCAL_RANK`` (the deepspeed launcher, torchrun, mpirun, srun without GPU binding). A rank
    bound to exactly one GPU of its own (``srun --gpus-per-task=1``, or a CUDA_VISIBLE_DEVICES
    per rank) uses that GPU, index 0. Anything else would put two ranks on one GPU and is
    refused. DeepSpeed indexes the GPU by ``LOCAL_RANK`` itself (``init_process_group(device_id)``,
    ``zero.Init``, the engine), so ``init_distributed`` exports the chosen index as LOCAL_RANK.
Which ninja builds DeepSpeed's ops, and the CUDA architectures it is given
    :func:`prepare_process` applies the workarounds of ``hp_deepspeed/compat/``
    (``compat.torch.environment_ninja_first``, ``compat.torch.environment_extensions_dir``,
    ``compat.deepspeed.sanitize_arch_list``): every rank JIT-builds with the interpreter's own
    ninja, into its environment's own build folder, and a ``TORCH_CUDA_ARCH_LIST`` entry such
    as ``9.0a``, which DeepSpeed's op builder cannot parse, loses its suffix.

Not here: what DeepSpeed does with the choice (``compat.deepspeed``), the process group
(``startup.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping

from hp_deepspeed.compat.deepspeed import accelerator_already_chosen, sanitize_arch_list
from hp_deepspeed.compat.torch import environment_extensions_dir, environment_ninja_first
from hp_deepspeed.errors import LaunchEnvironmentError


def cpu_requested(env: Mapping[str, str]) -> bool:
    """Whether the user asked for a CPU run (HP_DEVICE=cpu or HP_DIST_BACKEND=gloo), GPUs or not."""
    return env.get("HP_DEVICE", "").lower() == "cpu" or env.get("HP_DIST_BACKEND", "").lower() == "gloo"


def prepare_process(env: MutableMapping[str, str] | None = None) -> None:
    """Make this process's device choice binding for DeepSpeed; call before ``import deepspeed``.

    A CPU run exports ``DS_ACCELERATOR=cpu`` (and, when asked for on a GPU host, hides the GPUs
    before CUDA is initialised); a GPU run gets a ``TORCH_CUDA_ARCH_LIST`` DeepSpeed can parse.
    If DeepSpeed was already imported with another accelerator the run is refused, because its
    choice can no longer change.
    """
    env = os.environ if env is None else env
    environment_ninja_first(env)
    environment_extensions_dir(env)
    if cpu_requested(env):
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""  # before any CUDA call: counting GPUs may initialise CUDA
    elif _cuda_device_count() == 0:
        env["DS_ACCELERATOR"] = "cpu"
    if env.get("DS_ACCELERATOR") == "cpu":
        _check_deepspeed_accelerator("cpu")
    elif env.get("TORCH_CUDA_ARCH_LIST"):
        fixed, note = sanitize_arch_list(env["TORCH_CUDA_ARCH_LIST"])
        if note:
            print(f"hp-deepspeed: {note}", file=sys.stderr)
            env["TORCH_CUDA_ARCH_LIST"] = fixed


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _check_deepspeed_accelerator(expected: str) -> None:
    chosen = accelerator_already_chosen()
    if chosen is not None and chosen != expected:
        raise LaunchEnvironmentError(
            f"DeepSpeed was imported with the {chosen!r} accelerator before the device "
            f"was chosen ({expected!r}); set DS_ACCELERATOR={expected} in the environment")


def cuda_device_index(local_rank: int, local_world_size: int, device_count: int, visible: str | None) -> int:
    """The index of this rank's GPU among those it sees (see the module docstring)."""
    where = (f"local rank {local_rank} of {local_world_size} sees {device_count} GPU(s) "
             f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'})")
    if device_count == 0:
        raise LaunchEnvironmentError(f"{where}: no GPU for NCCL; set HP_DEVICE=cpu for a CPU run")
    if device_count >= local_world_size:
        return local_rank
    if device_count == 1 and visible:
        return 0  # bound to a GPU of its own (NCCL itself refuses two ranks on one GPU)
    raise LaunchEnvironmentError(
        f"{where}: ranks would share a GPU. Start one rank per GPU (--ntasks-per-node or "
        "--num_gpus equal to the GPUs per node), or bind each rank to its own GPU "
        "(srun --gpus-per-task=1); or set HP_DEVICE=cpu")
