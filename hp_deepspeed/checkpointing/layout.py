"""On-disk layout of a run's checkpoints, and the file-system rules that keep it consistent.

    RUN_DIR/checkpoints/
        latest                 name of the newest complete checkpoint ("step-1200"), replaced atomically
        best.json              {task: {"step": N, "score": x}}: the pins retention honours
        step-1200/
            COMPLETE           written last, by rank 0, after every rank reported its files durable;
                               records the manifest's digest
            manifest.json      every other file's size and xxh3-128 digest, checked before a resume
            params.json        parameter name -> full shape (mismatch errors name the parameter)
            optimizer_groups.json  every optimizer param group's lr, betas, weight_decay, ...
            trainer_state.json step, sampler state, metrics: whatever the trainer hands over
            config.yaml        the resolved job config
            rng/rank-R.pt      python / numpy / torch / CUDA generator states of rank R
            zero_pp_rank_R_mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's shards
            universal/         created on demand when resuming on another number of ranks
        step-1300.staging/     a save in progress (or a crashed one); never loaded, removed later

The invariant: a folder named ``step-N`` with a ``COMPLETE`` file is a whole checkpoint. Saves
write into ``step-N.staging`` and are renamed to ``step-N`` only after the marker exists, so a
crash at any point leaves at worst an ignored staging folder and a ``latest`` pointing at the
previous good checkpoint. Deletion removes the marker first, so a half-deleted folder is never
mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hp_deepspeed.errors import CheckpointError

MARKER = "COMPLETE"
LATEST = "latest"
BEST = "best.json"
PARAMS = "params.json"
OPTIMIZER_GROUPS = "optimizer_groups.json"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
RNG_DIR = "rng"
UNIVERSAL = "universal"
STAGING_SUFFIX = ".staging"
TRASH_SUFFIX = ".trash"
STEP_RE = re.compile(r"^step-(\d+)$")


def step_tag(step: int) -> str:
    return f"step-{step}"


def step_of(path: str | Path) -> int | None:
    """The N of a ``step-N`` folder name, None for anything else (staging, trash, universal)."""
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so readers see either the old file or the whole new one, even after a crash.

    Temp file in the same directory (so ``os.replace`` is a rename on one file system), fsync the
    data, rename, then fsync the directory so the rename itself survives a power loss.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_marker(step_dir: str | Path) -> dict | None:
    """The marker's contents, or None when the folder is not a complete checkpoint."""
    try:
        data = read_json(Path(step_dir) / MARKER)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        # The marker is written atomically, so a torn one means outside interference.
        raise CheckpointError(f"{step_dir}: marker {MARKER} is not valid JSON ({err})") from None
    return data if isinstance(data, dict) else None


def is_complete(step_dir: str | Path) -> bool:
    return read_marker(step_dir) is not None


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint found on disk."""

    path: Path
    step: int
    marker: dict

    @property
    def saved_at(self) -> float:
        return float(self.marker.get("time", 0.0))


def complete_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Every complete ``step-N`` folder under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_of(child)
        if step is None or not child.is_dir():
            continue
        marker = read_marker(child)
        if marker is not None:
            found.append(CheckpointInfo(child, step, marker))
    return sorted(found, key=lambda info: info.step)


def read_latest(root: str | Path) -> str | None:
    """The step folder name ``latest`` holds; None when it is missing or unreadable (not UTF-8,
    not a ``step-N`` name): the scan of complete checkpoints then decides, as when it is missing."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    return name if STEP_RE.match(name) else None


def find_latest(root: str | Path) -> CheckpointInfo | None:
    """The checkpoint ``resume="auto"`` loads: the newest complete one.

    The ``latest`` pointer is the fast, authoritative answer when it names a complete folder and no
    complete checkpoint was committed after it. It is stale when the process died between renaming
    a new checkpoint into place and updating the pointer (the scan then finds the newer, complete
    one), or when it names a folder that has since been deleted. "Newer" is the marker's commit
    time, not the step number: after a deliberate resume from an older step, checkpoints of the
    abandoned continuation have higher steps but older commits than the ones written since.
    """
    found = by_commit_order(complete_checkpoints(root))
    if not found:
        return None
    newest = found[-1]
    name = read_latest(root)
    if name is not None:
        for info in found:
            if info.path.name == name and info.saved_at >= newest.saved_at:
                return info
    return newest


def checkpoint_to_load(root: str | Path, spec: str, required: bool = False) -> CheckpointInfo | None:
    """The complete checkpoint ``spec`` names, checked from the files alone (cheap, no ranks), so
    ``validate`` (the launch scripts' preflight), ``eval`` and the trainer's resume refuse the same
    things before any model is built.

    ``spec``: ``"none"`` (None), ``"auto"`` (the newest complete checkpoint of ``root``, None when
    there is none) or a ``step-N`` folder. ``required`` (evaluation): None is an error too.

    A ``latest`` pointer with no complete checkpoint left means this folder held a run whose
    checkpoints were deleted. Starting afresh there would append to that run's metrics.jsonl and
    rank new evaluations against its best.json (so no new best would ever be kept): refused,
    with the two ways out named, rather than mixing two runs in one folder.
    """
    root = Path(root)
    if spec == "none":
        if required:
            raise CheckpointError("--checkpoint none: evaluation needs a checkpoint ('auto' or a step-N folder)")
        return None
    if spec != "auto":
        return _named_checkpoint(Path(spec))
    info = find_latest(root)
    pointer = read_latest(root)
    if info is None and pointer is not None:
        raise CheckpointError(
            f"{root / LATEST} names {pointer!r}, which no longer exists, and no complete checkpoint is left: "
            f"nothing to resume from; start afresh in another run.dir, or remove {root / LATEST} "
            f"(the new run then appends to this folder's metrics.jsonl)")
    if info is None and required:
        raise CheckpointError(f"{root}: no complete checkpoint to evaluate")
    return info


def resume_candidates(root: str | Path, spec: str) -> list[CheckpointInfo]:
    """What a resume tries, in order, until one passes verification: for ``"auto"`` the
    checkpoint ``checkpoint_to_load`` picks, then every other complete one, newest commit first;
    for a named folder that folder alone (an explicit choice is never swapped for another)."""
    first = checkpoint_to_load(root, spec)
    if first is None:
        return []
    if spec != "auto":
        return [first]
    others = [info for info in reversed(by_commit_order(complete_checkpoints(root))) if info.path != first.path]
    return [first, *others]


def _named_checkpoint(step_dir: Path) -> CheckpointInfo:
    if not step_dir.is_dir():
        raise CheckpointError(f"resume path {step_dir} does not exist or is not a folder")
    step = step_of(step_dir)
    if step is None:
        raise CheckpointError(f"resume path {step_dir} is not a step-N checkpoint folder")
    marker = read_marker(step_dir)
    if marker is None:
        raise CheckpointError(f"{step_dir}: no {MARKER} marker; this save never finished and cannot be loaded")
    return CheckpointInfo(step_dir, step, marker)


def by_commit_order(checkpoints: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Oldest commit first. Recency is the commit time, not the step: after a deliberate resume
    from an older step, the abandoned continuation's higher steps are the old ones."""
    return sorted(checkpoints, key=lambda info: (info.saved_at, info.step))


def select_for_deletion(
    steps_oldest_first: Sequence[int], keep_last: int, pinned: Iterable[int], protect: Iterable[int] = ()
) -> list[int]:
    """Steps retention deletes: everything but the ``keep_last`` most recent, the pins and ``protect``."""
    keep = set(steps_oldest_first[-keep_last:]) | set(pinned) | set(protect)
    return [s for s in steps_oldest_first if s not in keep]


def retire_checkpoint(step_dir: str | Path) -> Path:
    """Take a checkpoint out of use so that no crash leaves a "complete" partial folder; returns
    the ``step-N.trash`` folder left to remove (fast: no file data is touched).

    The marker goes first (the folder stops being a checkpoint at that instant), then the folder is
    renamed out of the ``step-N`` namespace. ``remove_debris`` removes a trash folder a crash left.
    """
    step_dir = Path(step_dir)
    (step_dir / MARKER).unlink(missing_ok=True)
    fsync_path(step_dir)
    trash = step_dir.with_name(step_dir.name + TRASH_SUFFIX)
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(step_dir, trash)
    return trash


def remove_checkpoint(step_dir: str | Path) -> None:
    """Delete a checkpoint: ``retire_checkpoint``, then remove its files."""
    shutil.rmtree(retire_checkpoint(step_dir))


def remove_debris(root: str | Path, keep: Iterable[str | Path] = ()) -> list[Path]:
    """Remove leftovers of crashed saves and deletions: staging and trash folders, and ``step-N``
    folders without a marker. Only rank 0 calls this, and only when no save is in flight."""
    root = Path(root)
    keep_names = {Path(k).name for k in keep}
    removed = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if not child.is_dir() or child.name in keep_names:
            continue
        leftover = child.name.endswith((STAGING_SUFFIX, TRASH_SUFFIX))
        if leftover or (step_of(child) is not None and not is_complete(child)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def compare_metadata(step_dir: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's recorded identity and the running job.

    ``world_size`` is not compared here: a different number of ranks is handled by the universal
    conversion, not refused.
    """
    problems = []
    for key, what in (("zero_stage", "ZeRO stage"), ("precision", "precision")):
        if saved.get(key) != current.get(key):
            problems.append(f"{what}: checkpoint has {saved.get(key)!r}, this job has {current.get(key)!r}")
    if saved.get("param_count") != current.get("param_count"):
        problems.append(
            f"parameter count: checkpoint has {saved.get('param_count')}, this model has {current.get('param_count')}"
        )
    saved_model, current_model = saved.get("model_config") or {}, current.get("model_config") or {}
    for key in sorted(set(saved_model) | set(current_model)):
        if saved_model.get(key) != current_model.get(key):
            problems.append(
                f"model config {key}: checkpoint has {saved_model.get(key)!r}, this job has {current_model.get(key)!r}"
            )
    return problems


def compare_params(saved: Mapping[str, list[int]], current: Mapping[str, list[int]], limit: int = 5) -> list[str]:
    """Parameter names missing, unexpected or reshaped between checkpoint and model (first few of each)."""
    problems = []
    missing = sorted(set(saved) - set(current))
    unexpected = sorted(set(current) - set(saved))
    reshaped = sorted(n for n in set(saved) & set(current) if list(saved[n]) != list(current[n]))
    if missing:
        problems.append(f"{len(missing)} parameters in the checkpoint but not in the model, e.g. {missing[:limit]}")
    if unexpected:
        problems.append(f"{len(unexpected)} parameters in the model but not in the checkpoint, e.g. {unexpected[:limit]}")
    for name in reshaped[:limit]:
        problems.append(f"parameter {name}: checkpoint shape {list(saved[name])}, model shape {list(current[name])}")
    return problems
