"""Workarounds for DeepSpeed's and torch's checkpoint internals, each with the version it was
written against and why, so that an upgrade knows what to re-check.

Owns every use of a private or undocumented attribute the checkpoint manager needs:
``engine.checkpoint_engine`` and ``engine._copy_recovery_script`` (routing the writes of a save),
``engine._config.load_universal_checkpoint`` (choosing native or universal loading per call),
``engine.optimizer.optimizer`` (the wrapped torch optimizer), the two defects of DeepSpeed's
universal ZeRO-3 loader, and torch's CRC32 switch; on the load side, ``engine.checkpoint_engine.load``
(memory-mapped reads, ``mmap_loading``). Does not own the save protocol or the checks of what is
loaded (``hp_deepspeed.checkpointing.manager``).
"""

from __future__ import annotations

import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

WRITTEN_AGAINST_DEEPSPEED = "0.19.8"
WRITTEN_AGAINST_TORCH = "2.13.0"

# How the optimizer runs, not what it optimises: the resuming job's own choice wins (see
# ``implementation_flags``).
IMPLEMENTATION_KEYS = ("fused", "capturable", "foreach", "differentiable")


def torch_save_without_crc32(obj: Any, file_like) -> None:
    """``torch.save`` with torch's per-record CRC32 off (torch 2.13,
    ``torch.serialization.set_crc32_options``, a process-wide switch put back afterwards).

    Why: the CRC32 costs about a third of a save's time on one core, and the project's own
    xxh3-128 digest of the whole file (``checkpointing.integrity``) already detects corruption,
    at load too; torch.load reads files written either way.
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, file_like)
    finally:
        torch.serialization.set_crc32_options(previous)


@contextmanager
def route_checkpoint_writes(
    engine, save: Callable[[Any, str], None], guard: Callable[[str, Callable[[], Any]], None]
) -> Iterator[None]:
    """During ``engine.save_checkpoint``, send every file it writes through ``save(state, path)``
    and run its other writes under ``guard(path, run)``, which records instead of raising.

    DeepSpeed 0.19.8 writes every file of ``save_checkpoint`` through
    ``engine.checkpoint_engine.save(state_dict, path)``, except the ZeRO recovery scripts that
    ``engine._copy_recovery_script(save_dir)`` copies next to the checkpoints. Why route them: so
    that each file is fsynced and checksummed as it is written, and a failed write on one rank is
    recorded rather than raised in the middle of ``save_checkpoint``, whose closing barrier the
    other ranks would otherwise wait in until the collective timeout. An engine without these
    attributes (a test double) is left alone; its files are adopted by the manifest instead.
    """
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    copy_scripts = getattr(engine, "_copy_recovery_script", None)
    patched = []
    if checkpoint_engine is not None and callable(getattr(checkpoint_engine, "save", None)):
        checkpoint_engine.save = lambda state_dict, path: save(state_dict, path)
        patched.append((checkpoint_engine, "save"))
    if callable(copy_scripts):
        engine._copy_recovery_script = lambda save_dir: guard(save_dir, lambda: copy_scripts(save_dir))
        patched.append((engine, "_copy_recovery_script"))
    try:
        yield
    finally:
        for owner, name in patched:  # the instance attribute goes, the class's method shows again
            delattr(owner, name)


@contextmanager
def universal_loading(engine, universal: bool) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` load a universal checkpoint (or not) for one call.

    DeepSpeed 0.19.8 chooses native or universal loading by reading
    ``engine._config.load_universal_checkpoint`` during ``load_checkpoint``; for ZeRO-3 nothing at
    initialize time depends on it. Why: setting it for this one call is equivalent to
    ``"checkpoint": {"load_universal": true}`` in the ds_config, whichever way the config was built.
    """
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = previous


def base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (DeepSpeed 0.19.8: the ZeRO wrappers keep it
    as ``.optimizer``; without ZeRO the engine holds it directly). Why: its param_groups mirror the
    groups the trainer passed in, hyperparameters included."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def implementation_flags(engine) -> list[dict[str, Any]]:
    """Each param group's implementation flags (fused, capturable, ...). A load puts the saving
    job's values back (torch's load_state_dict, and ``repair_universal_load``), so a GPU job
    resuming a CPU job's checkpoint would lose its fused AdamW, and a CPU job resuming a GPU one
    would get capturable=True, which refuses CPU tensors: the caller puts these back after a load."""
    return [{k: group[k] for k in IMPLEMENTATION_KEYS if k in group} for group in base_optimizer(engine).param_groups]


def restore_implementation_flags(engine, flags: list[dict[str, Any]]) -> None:
    for group, own in zip(base_optimizer(engine).param_groups, flags):
        group.update(own)


class ParamGroupMismatch(ValueError):
    """The checkpoint's optimizer has another number of param groups than the job's."""


def repair_universal_load(engine, saved_groups: list[dict[str, Any]], where: Path) -> None:
    """Fix two defects of DeepSpeed's universal ZeRO-3 loader (0.19.8,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), both caught by the 2->1 rank test:

    * it writes param group 0's hyperparameters into every group, so e.g. the no-weight-decay
      group of biases and LayerNorms silently gets weight decay. The manager saved every group's
      settings (``optimizer_groups.json``); put them back, but for the implementation flags.
    * it stores one and the same ``step`` tensor in the state of every sub-group; torch's Adam
      increments it in place, so with k sub-groups the step advances k times per update and the
      bias correction of all but the first sub-group is wrong. Give each sub-group its own copy,
      where torch's AdamW wants it (:func:`own_step`).
    """
    optimizer = base_optimizer(engine)
    groups = optimizer.param_groups
    if len(groups) != len(saved_groups):
        raise ParamGroupMismatch(
            f"{where}: checkpoint has {len(saved_groups)} optimizer param groups, this job has {len(groups)}")
    for group, values in zip(groups, saved_groups):
        for key, value in values.items():
            if key in group and key not in IMPLEMENTATION_KEYS:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
    # Every state, not only those of the params in param_groups: ZeRO-3 puts one sub-group's
    # flat partition at a time into its group while stepping.
    on_device = any(group.get("fused") or group.get("capturable") for group in groups)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = own_step(state["step"], state.get("exp_avg"), on_device)


def own_step(step: torch.Tensor, moment: torch.Tensor | None, on_device: bool) -> torch.Tensor:
    """A private copy of Adam's ``step``, placed as torch's own ``load_state_dict`` places it: for
    the fused or capturable AdamW (the GPU default, see training/ds_config.py), which refuses a
    CPU step, in fp32 on the device of the parameter (that of its ``moment``); else as saved."""
    if on_device and moment is not None:
        return step.to(device=moment.device, dtype=torch.float32, copy=True)
    return step.clone()


# ---------------------------------------------------------------------------------- load side


def _torch_load_mapped(path: str, map_location=None):
    """``torch.load`` of a DeepSpeed checkpoint file, memory-mapped where the format allows it
    (torch 2.13: ``mmap=True`` needs the zip format; older pickled files are read as before)."""
    mapped = zipfile.is_zipfile(path)
    return torch.load(path, map_location=map_location, weights_only=False, mmap=mapped)


@contextmanager
def mmap_loading(engine) -> Iterator[None]:
    """During ``engine.load_checkpoint``: DeepSpeed's files are memory-mapped, and the optimizer
    state it loads ends in the engine's own state tensors, not in the mapped file.

    DeepSpeed 0.19.8 reads every file of ``load_checkpoint`` through
    ``engine.checkpoint_engine.load(path, map_location)``, a plain ``torch.load``, which allocates
    a fresh tensor for every record and copies the file into it; ZeRO then copies the fp32
    partitions once more into the engine's flat buffers, and torch's ``Optimizer.load_state_dict``
    keeps the loaded moment tensors themselves. Why: those fresh allocations and that first copy
    were most of the load (profiled on a ZeRO-3 shard, cold cache), while the resume's
    verification had just brought the file into the page cache. Mapped, the bytes are copied
    once, from the page cache.

    A tensor that stays a view of the mapping would keep the file open for the rest of the run
    (retention could then not free its space) and turn the first optimizer step into page-by-page
    copy-on-write faults; so after the load every CPU optimizer state tensor is copied into the
    engine's own tensor of the same key, shape and dtype where it had one before the load, or
    else cloned (a pristine ZeRO-3 engine has no Adam moments yet: torch creates them at the
    first step). An engine without a ``checkpoint_engine`` (a test double) is left alone.
    """
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    patched = checkpoint_engine is not None and callable(getattr(checkpoint_engine, "load", None))
    if patched:
        checkpoint_engine.load = _torch_load_mapped
    optimizer = base_optimizer(engine) if getattr(engine, "optimizer", None) is not None else None
    own = {} if optimizer is None else {
        param: {key: value for key, value in state.items() if torch.is_tensor(value)}
        for param, state in optimizer.state.items()}
    try:
        yield
    finally:
        if patched:
            del checkpoint_engine.load  # the class's method shows again
    if optimizer is not None:
        rehome_optimizer_state(optimizer, own)


def rehome_optimizer_state(optimizer, own: dict) -> None:
    """Put each CPU state tensor of ``optimizer`` into ``own``'s tensor for the same param and key
    (same shape, dtype, device), else into a private copy: no state tensor is left sharing memory
    with what ``torch.load`` returned."""
    for param, state in optimizer.state.items():
        pristine = own.get(param, {})
        for key, value in list(state.items()):
            if not torch.is_tensor(value) or value.device.type != "cpu":
                continue  # moved to an accelerator by load_state_dict: already a copy
            target = pristine.get(key)
            if target is value:
                continue
            if (target is not None and target.shape == value.shape and target.dtype == value.dtype
                    and target.device == value.device):
                target.copy_(value)
                state[key] = target
            else:
                state[key] = value.clone()
