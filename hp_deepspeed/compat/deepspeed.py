"""DeepSpeed behaviours the project works around, each with the version it was written against.

Owns: every place ``hp_deepspeed`` reads or changes a DeepSpeed internal (a module attribute
DeepSpeed does not document, a cache, an assertion's inputs). Does not own: when these run
(``launching/`` calls them at start-up and exit, ``training/`` and ``model/`` while building),
nor the checkpoint workarounds (``compat/checkpoint.py``).

Every lookup of a DeepSpeed name here is defensive (``sys.modules`` and ``getattr``): a version
without the name must still start and exit; the tests named in each docstring catch a version
where a workaround stops being needed or stops working.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import io
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, ContextManager, MutableMapping

from hp_deepspeed.compat.torch import unbind_default_process_groups
from hp_deepspeed.errors import LaunchEnvironmentError

# ----------------------------------------------------------------------------- start-up

_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]*)(\+PTX)?$")


def sanitize_arch_list(value: str) -> tuple[str, str | None]:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed's op builder can parse it, and a note when changed.

    DeepSpeed 0.19.8: the op builder parses each entry with ``int()`` and crashes on the
    arch-specific ``9.0a`` Hopper images set; the suffix only enables sm_90a-only instructions
    DeepSpeed's kernels do not use, so it is dropped (tests/training/test_gpu_rules.py).
    """
    entries = [e for e in re.split(r"[;\s]+", value.strip()) if e]
    kept = []
    for entry in entries:
        match = _ARCH.match(entry)
        if match is None:
            raise LaunchEnvironmentError(
                f"TORCH_CUDA_ARCH_LIST={value!r}: entry {entry!r} is not MAJOR.MINOR[+PTX] (e.g. 9.0 or 8.0;9.0+PTX)")
        kept.append(f"{match[1]}.{match[2]}{match[4] or ''}")
    fixed = ";".join(dict.fromkeys(kept))
    if fixed == ";".join(entries):
        return value, None
    return fixed, (f"TORCH_CUDA_ARCH_LIST={value!r} -> {fixed!r}: DeepSpeed's op builder cannot parse "
                   "arch-specific suffixes such as 9.0a, and its kernels do not need them")


def accelerator_already_chosen() -> str | None:
    """The device name of the accelerator DeepSpeed already chose, or None before its choice.

    DeepSpeed 0.19.8 picks its accelerator once, at first import, and keeps it in
    ``deepspeed.accelerator.real_accelerator.ds_accelerator``; a later DS_ACCELERATOR is ignored.
    """
    module = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(module, "ds_accelerator", None)
    return None if chosen is None else chosen.device_name()


def export_device_index(index: int, env: MutableMapping[str, str] | None = None) -> None:
    """Tell DeepSpeed the rank's GPU: it takes ``cuda:LOCAL_RANK`` everywhere.

    DeepSpeed 0.19.8 indexes the GPU by LOCAL_RANK (``init_process_group(device_id)``,
    ``zero.Init``, the engine), which differs from the node-local rank only for a rank bound to
    its own GPU (index 0); under Open MPI the engine also asserts LOCAL_RANK ==
    OMPI_COMM_WORLD_LOCAL_RANK, so that one follows (tests/training/test_gpu_rules.py).
    """
    env = os.environ if env is None else env
    env["LOCAL_RANK"] = str(index)
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        env["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)


# ----------------------------------------------------------------------------- building

def zero_init(ds_config: dict[str, Any] | str) -> ContextManager:
    """``deepspeed.zero.Init`` for ``ds_config``, with no dtype argument.

    DeepSpeed 0.19.8 ignores an explicit dtype on accelerators without fp16 (``_set_dtype``) and
    creates bf16 weights; without one it takes the dtype from the config's precision section.
    """
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def zero_stage_for_bf16_fp32_accumulation(stage: int) -> int:
    """The ZeRO stage to run bf16 weights with fp32 gradient accumulation at.

    DeepSpeed 0.19.8 has no stage-0 engine for that mix (``_do_optimizer_sanity_check`` raises
    ``NotImplementedError``); its stage-1 path for exactly these types is ``BF16_Optimizer``
    (fp32 master weights and accumulation, no ZeRO-3 hooks; at one rank the memory of stage 0).
    """
    return 1 if stage == 0 else stage


# ----------------------------------------------------------------------------- exit

def destroy_engines() -> None:
    """``destroy()`` every DeepSpeed engine still alive in this process.

    DeepSpeed 0.19.8: an engine outlives its owner (its gradient hooks sit on autograd nodes,
    and ZeRO-3 puts the model on ``parameter_offload.FWD_MODULE_STACK``, never popped); the
    engine, its optimizer and every ZeRO-3 parameter hold process groups, so they keep the
    groups' threads running to interpreter exit, which then aborts. ``destroy()`` removes the
    hooks. A failed clean-up is one warning line: the work is done and saved by then
    (tests/launching/test_shutdown.py).
    """
    engine_class = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    if engine_class is None:  # DeepSpeed never imported: no engine exists
        return
    # By type, here and below: isinstance would read attributes of every object, and a few warn.
    for engine in [o for o in gc.get_objects() if issubclass(type(o), engine_class)]:
        try:
            engine.destroy()
        except Exception as err:
            print(f"hp-deepspeed: warning: DeepSpeed engine clean-up at exit failed ({type(err).__name__}: {err})",
                  file=sys.stderr, flush=True)


def release_group_holders() -> None:
    """Drop the process-wide references to process groups that outlive ``destroy_process_group``,
    then collect, so that the groups' threads end now rather than during interpreter exit.

    DeepSpeed 0.19.8 keeps them in:

    * ZeRO-3's stack of modules in forward (``FWD_MODULE_STACK``), which keeps its top module;
    * ``deepspeed.utils.groups``' cached groups (``_WORLD_GROUP`` and others);
    * methods memoised with ``functools.lru_cache`` on the class (ZeRO-3's
      ``PartitionedParameterCoordinator.__params_to_release``), which keep every instance;
    * default arguments bound to the world group at import (``TorchBackend.barrier``; torch's
      own in ``compat.torch``), handled in the same pass over the objects.

    tests/launching/test_shutdown.py checks that no gloo or TCP-store thread is left.
    """
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith("_GROUP") and value is not None:
                setattr(groups, name, {} if isinstance(value, dict) else None)
    functions = []
    for obj in gc.get_objects():
        if type(obj) is functools._lru_cache_wrapper:
            if str(getattr(obj, "__module__", "")).startswith("deepspeed."):
                obj.cache_clear()
        elif type(obj) is types.FunctionType and (obj.__defaults__ or obj.__kwdefaults__):
            functions.append(obj)
    unbind_default_process_groups(functions)
    del functions
    gc.collect()


def cpu_allreduce_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce op creates for ``rank`` at start-up
    (``ops/csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``).
    """
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{rank}"
    return Path("/dev/shm") / name


def remove_cpu_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's CPU all-reduce file.

    DeepSpeed 0.19.8 never unlinks it (69 MB per rank, in RAM): every CPU run left one in
    /dev/shm. The peers mapped it at start-up, so removing the name takes nothing from them.
    """
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def quiet_shm_op_message() -> None:
    """DeepSpeed 0.19.8: every CPU rank prints "deepspeed_shm_comm_op built successfully" at every
    start, also when the op only comes out of the extensions cache, a line per rank that tells a
    person nothing. The op still loads as before; a failed build still raises DeepSpeed's error."""
    try:  # by module path: the package's attribute ``torch`` is the torch module itself
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    original = getattr(ds_comm_torch, "build_shm_op", None)
    if original is None or getattr(original, "_hp_quiet", False):
        return

    def build_shm_op():
        with contextlib.redirect_stdout(io.StringIO()):
            return original()

    build_shm_op._hp_quiet = True
    ds_comm_torch.build_shm_op = build_shm_op


# ----------------------------------------------------------------------------- launcher output

# "[2026-12-06 10:30:21,402] [INFO] [launch.py:163:main] ...", after pdsh's "node1: " prefix.
_NODE_LAUNCHER_INFO = re.compile(rb"^(?:[\w.-]+: )?\[[\d-]+ [\d:,]+\] \[INFO\] \[launch\.py:\d+:")


def is_node_launcher_info(line: bytes) -> bool:
    """Whether ``line`` is an info line of DeepSpeed's per-node launcher (``launch.py``).

    DeepSpeed 0.19.8's pdsh runner starts ``deepspeed.launcher.launch`` on every node without
    the ``--log_level`` it was given (only a one-node launch passes it on), and launch.py reads
    its level from nothing else: each node logs its command, NCCL variables, world info, the
    ranks' pids and ``Setting CUDA_VISIBLE_DEVICES`` (also on a CPU node) at INFO, which says
    nothing to a person. The openmpi and mpich runners start no launch.py; their own lines obey
    the runner's ``--log_level`` (tests/launching/test_multinode_e2e.py)."""
    return _NODE_LAUNCHER_INFO.match(line) is not None


# ----------------------------------------------------------------------------- universal checkpoints

# DeepSpeed 0.19.8's ``ds_to_universal`` gives no progress but its output: a line per phase on
# stdout ("*** 1. Extracting ZeRO fragments", "*** 2. Merging slices .....") and one tqdm bar on
# stderr over each phase's work items (the ranks' shards while extracting, the parameters while
# merging). tests/test_faults_cli.py runs the real tool and fails when these stop being recognised.
_UNIVERSAL_PHASE = re.compile(r"^\*\*\* ([\d.]+)\. (.+?)[\s.]*$")
_TQDM_COUNT = re.compile(r"\|\s*(\d+)/(\d+) \[")


def parse_universal_output(piece: str) -> tuple[str, str, str] | tuple[str, int, int] | None:
    """One line (or carriage-return-separated bar update) of ``ds_to_universal``'s output:
    ``("phase", number, title)``, ``("count", done, total)``, or None for anything else."""
    phase = _UNIVERSAL_PHASE.match(piece.strip())
    if phase:
        return "phase", phase.group(1), phase.group(2)
    count = _TQDM_COUNT.search(piece)
    if count:
        return "count", int(count.group(1)), int(count.group(2))
    return None
