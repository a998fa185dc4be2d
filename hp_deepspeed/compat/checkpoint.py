"""Workarounds for DeepSpeed's and torch's checkpoint internals, each with the version it was
written against and why, so that an upgrade knows what to re-check.

Owns every use of a private or undocumented attribute the checkpoint manager needs:
``engine.checkpoint_engine`` and ``engine._copy_recovery_script`` (routing the writes of a save),
``engine._config.load_universal_checkpoint`` (choosing native or universal loading per call),
``engine.optimizer.optimizer`` (the wrapped torch optimizer), the two defects of DeepSpeed's
universal ZeRO-3 loader, and torch's CRC32 switch; on the load side, ``engine.checkpoint_engine.load``
(files served from the resume's verified copy or memory-mapped, ``mmap_loading``) and torch's
``torch.serialization._load`` (tensors over that copy, ``load_held``). Does not own the save protocol or the checks of what is
loaded (``hp_deepspeed.checkpointing.manager``).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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


class _HeldReader:
    """A read-only file over a ``HeldFile``'s pieces: what torch's zip reader reads the headers and
    the pickle from, so that every byte of the load comes from the verified copy."""

    def __init__(self, held) -> None:
        self.held = held
        self.position = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.held.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.held.size - self.position
        data = self.held.read_at(self.position, max(0, min(size, self.held.size - self.position)))
        self.position += len(data)
        return data


class _HeldStorages:
    """Stands in for the one storage over the whole file that ``torch.serialization._load`` slices
    when it loads memory-mapped: each slice is the record's own held buffer."""

    def __init__(self, held) -> None:
        self.held = held

    def __getitem__(self, span: slice) -> torch.UntypedStorage:
        return self.held.storage_at(span.start, span.stop - span.start)


def load_held(held, map_location=None):
    """``torch.load`` of a file already read into memory and verified
    (``checkpointing.preload.HeldFile``): tensors are built over the held buffers, nothing is read
    from the disk or copied (torch 2.13, ``torch.serialization._load`` with ``overall_storage``,
    the path ``torch.load(mmap=True)`` takes; unpickled like DeepSpeed's own ``torch.load``, with
    ``weights_only=False``).

    Why: the resume's verification already read every byte into its final buffer; loading the
    file again would read it from the page cache and copy each record once more. A file whose
    records torch's reader finds at other offsets than the ones read is refused (ValueError).
    """
    reader = torch._C.PyTorchFileReader(_HeldReader(held))
    offsets = {reader.get_record_offset(name) for name in reader.get_all_records()}
    stray = sorted(set(held.records) - offsets)
    if stray:
        raise ValueError(f"{held.path}: the records read at bytes {stray} are not where torch's reader finds them")
    return torch.serialization._load(reader, map_location, pickle, overall_storage=_HeldStorages(held),
                                     encoding="utf-8")


@contextmanager
def mmap_loading(engine, held: Mapping[str, Any] | None = None) -> Iterator[None]:
    """During ``engine.load_checkpoint``: each file DeepSpeed reads comes from ``held`` (real path
    -> ``HeldFile``, read and verified by the resume's single pass) where it is there, else
    memory-mapped; and the optimizer state it loads ends in memory of the process's own, not in a
    mapped file.

    DeepSpeed 0.19.8 reads every file of ``load_checkpoint`` through
    ``engine.checkpoint_engine.load(path, map_location)``, a plain ``torch.load``, which allocates
    a fresh tensor for every record and copies the file into it; ZeRO-3 then copies the fp32
    partition into its flat buffer (with an fp32 model that buffer is also the "fp16" one, so the
    second copy is a no-op), and torch's ``Optimizer.load_state_dict`` keeps the loaded moment
    tensors themselves. Why: the held files' records already sit in private buffers, so the
    moments keep the buffers the disk was read into; a mapped file's records are views of the
    page cache and are copied once, from there.

    A tensor left on a mapping would keep the file open for the rest of the run (retention could
    then not free its space) and turn the first optimizer step into page-by-page copy-on-write
    faults; so after the load every CPU optimizer state tensor that is not in a held buffer is
    copied into the engine's own tensor of the same key, shape and dtype where it had one before
    the load, or else cloned (a pristine ZeRO-3 engine has no Adam moments yet: torch creates them
    at the first step). An engine without a ``checkpoint_engine`` (a test double) is left alone.
    """
    held = dict(held or {})
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    patched = checkpoint_engine is not None and callable(getattr(checkpoint_engine, "load", None))
    if patched and held:
        def _load_held_or_mapped(path: str, map_location=None):
            found = held.get(os.path.realpath(path))
            if found is None:
                return _torch_load_mapped(path, map_location)
            state = load_held(found, map_location)
            adopt_fp32_partitions(engine, state, found.private_pointers())
            return state

        checkpoint_engine.load = _load_held_or_mapped
    elif patched:
        checkpoint_engine.load = _torch_load_mapped
    optimizer = base_optimizer(engine) if getattr(engine, "optimizer", None) is not None else None
    own = {} if optimizer is None else {
        param: {key: value for key, value in state.items() if torch.is_tensor(value)}
        for param, state in optimizer.state.items()}
    private = {pointer for file in held.values() for pointer in file.private_pointers()}
    try:
        yield
    finally:
        if patched:
            del checkpoint_engine.load  # the class's method shows again
    if optimizer is not None:
        rehome_optimizer_state(optimizer, own, private)


def adopt_fp32_partitions(engine, state: Any, private: set[int]) -> int:
    """Let a ZeRO-3 engine's fp32 partitions take over the loaded ones' buffers, where those are
    held buffers of the process's own (``private`` data pointers); returns how many it adopted.

    DeepSpeed 0.19.8's ZeRO-3 ``_rigid_load_state_dict`` copies the file's
    ``state["optimizer_state_dict"]["fp32_flat_groups"][i]``
    into ``optimizer.fp32_partitioned_groups_flat[i]`` (and that into the "fp16" flat buffer,
    with an fp32 model the same tensor). Once the engine's tensor shares the loaded one's storage
    (``.data`` swapped: the same tensor object, so the optimizer's state keys and param groups
    still hold), torch's ``copy_`` sees source and destination are one and returns at once, and
    DeepSpeed's own unflatten then points every parameter partition into it. Why: that copy was
    most of what a CPU-resident resume had left after the single read (a third of the bytes).
    Only a CPU fp32 master that is not pinned memory is swapped (an offloaded master is pinned
    for fast transfers; a device one is copied by DeepSpeed as before), and only when shape,
    dtype and count match; otherwise DeepSpeed copies as it always did.
    """
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    ours = getattr(getattr(engine, "optimizer", None), "fp32_partitioned_groups_flat", None)
    # A ZeRO file holds the optimizer's state dict under OPTIMIZER_STATE_DICT.
    zero = state.get(OPTIMIZER_STATE_DICT) if isinstance(state, dict) else None
    saved = zero.get(FP32_FLAT_GROUPS) if isinstance(zero, dict) else None
    if not ours or not isinstance(saved, (list, tuple)) or len(saved) != len(ours):
        return 0
    fits = all(torch.is_tensor(new) and new.device.type == "cpu" and old.device.type == "cpu"
               and new.dtype == old.dtype and new.shape == old.shape and new.is_contiguous()
               and new.untyped_storage().data_ptr() in private and not old.is_pinned()
               for old, new in zip(ours, saved))
    if not fits:
        return 0
    for old, new in zip(ours, saved):
        old.data = new.data
    return len(ours)


def rehome_optimizer_state(optimizer, own: dict, private: set[int] = frozenset()) -> None:
    """Put each CPU state tensor of ``optimizer`` into ``own``'s tensor for the same param and key
    (same shape, dtype, device), else into a private copy: no state tensor is left sharing memory
    with what ``torch.load`` returned. Tensors whose storage starts at one of the ``private``
    data pointers (buffers the resume read the file into) are already the process's own: kept."""
    for param, state in optimizer.state.items():
        pristine = own.get(param, {})
        for key, value in list(state.items()):
            if not torch.is_tensor(value) or value.device.type != "cpu":
                continue  # moved to an accelerator by load_state_dict: already a copy
            if value.untyped_storage().data_ptr() in private:
                continue
            target = pristine.get(key)
            if target is value:
                continue
            if (target is not None and target.shape == value.shape and target.dtype == value.dtype
                    and target.device == value.device):
                target.copy_(value)
                state[key] = target
            else:
                state[key] = value.clone()
