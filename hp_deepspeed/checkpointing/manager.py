"""``CheckpointManager``: save, rotate and resume a DeepSpeed run as crash-safe ``step-N`` folders.

The trainer (hp_deepspeed/training/trainer.py) owns one manager and calls, on every rank:

    manager = CheckpointManager(cfg.checkpoint, run_dir, model_config=architecture)
    point = manager.find_resume_point(cfg.checkpoint.resume)  # before building the model: cheap checks
    engine = deepspeed.initialize(...)
    state = manager.load(engine, point) if point else None    # module, optimizer, scheduler, RNG;
                                                              # universal when the world size changed
    ...
    improved = manager.record_eval(step, {"glue/rte": 71.2})  # higher is better; pins the best per task
    if manager.due(step) or last or improved or stopping:
        manager.save(engine, step, {"step": step, "data": stream.state_dict()}, to_dict(cfg))

Save protocol (see ``layout`` for the folder layout):
 1. rank 0 removes debris of earlier crashed saves; barrier.
 2. every rank writes its DeepSpeed shards (``engine.save_checkpoint`` into ``step-N.staging``) and
    its RNG file and fsyncs them; rank 0 adds trainer_state.json, config.yaml, params.json.
 3. ``all_reduce(MIN)`` of a per-rank success flag: the proof that every rank's files are durable
    (a plain barrier would also pass when a rank had caught its own write error).
 4. rank 0 checks every rank's files are present, writes ``COMPLETE``, renames the folder to
    ``step-N``, atomically repoints ``latest``, then applies retention. Rank 0's outcome is
    broadcast so every rank returns (or raises) together: a rank that exits right after ``save``
    (preemption) does so only once the checkpoint is official.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import yaml

from hp_deepspeed.checkpointing import rng
from hp_deepspeed.checkpointing.config import CheckpointConfig
from hp_deepspeed.checkpointing.layout import (
    BEST,
    CONFIG,
    LATEST,
    MARKER,
    OPTIMIZER_GROUPS,
    PARAMS,
    STAGING_SUFFIX,
    TRAINER_STATE,
    UNIVERSAL,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    by_commit_order,
    checkpoint_to_load,
    compare_metadata,
    compare_params,
    complete_checkpoints,
    fsync_path,
    read_json,
    read_latest,
    read_marker,
    remove_checkpoint,
    remove_debris,
    select_for_deletion,
    step_tag,
)
from hp_deepspeed.checkpointing.universal import ensure_universal
from hp_deepspeed.launching import collectives

log = logging.getLogger(__name__)

CLIENT_STEP_KEY = "hp_step"


def _precision(engine) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def _param_shapes(engine) -> dict[str, list[int]]:
    # Under ZeRO-3 a parameter's local tensor is an empty placeholder; ds_shape is the full shape.
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()}


def _base_optimizer(engine):
    # The ZeRO wrapper keeps the wrapped torch optimizer, whose param_groups mirror the groups the
    # trainer passed in (hyperparameters included); without ZeRO the engine holds it directly.
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _group_hyperparameters(engine) -> list[dict[str, Any]]:
    """Each optimizer param group's scalar settings (lr, betas, weight_decay, ...), JSON-able."""
    def plain(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params" and plain(v)}
            for group in _base_optimizer(engine).param_groups]


# How the optimizer runs, not what it optimises: the resuming job's own choice wins. A load puts
# the saving job's values back into every param group (torch's load_state_dict, and our repair
# below), so a GPU job resuming a CPU job's checkpoint would lose its fused AdamW, and a CPU job
# resuming a GPU one would get capturable=True, which refuses CPU tensors.
_IMPLEMENTATION_KEYS = ("fused", "capturable", "foreach", "differentiable")


def _implementation_flags(engine) -> list[dict[str, Any]]:
    return [{k: group[k] for k in _IMPLEMENTATION_KEYS if k in group} for group in _base_optimizer(engine).param_groups]


def _restore_implementation_flags(engine, flags: list[dict[str, Any]]) -> None:
    for group, own in zip(_base_optimizer(engine).param_groups, flags):
        group.update(own)


def _repair_universal_load(engine, saved_groups: list[dict[str, Any]], where: Path) -> None:
    """Fix two defects of DeepSpeed's universal ZeRO-3 loader (0.19.8,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), both caught by the 2->1 rank test:

    * it writes param group 0's hyperparameters into every group, so e.g. the no-weight-decay
      group of biases and LayerNorms silently gets weight decay. We saved every group's settings
      (``optimizer_groups.json``); put them back, but for the implementation flags.
    * it stores one and the same ``step`` tensor in the state of every sub-group; torch's Adam
      increments it in place, so with k sub-groups the step advances k times per update and the
      bias correction of all but the first sub-group is wrong. Give each sub-group its own copy,
      where torch's AdamW wants it (:func:`own_step`).
    """
    optimizer = _base_optimizer(engine)
    groups = optimizer.param_groups
    if len(groups) != len(saved_groups):
        raise CheckpointError(
            f"{where}: checkpoint has {len(saved_groups)} optimizer param groups, this job has {len(groups)}")
    for group, values in zip(groups, saved_groups):
        for key, value in values.items():
            if key in group and key not in _IMPLEMENTATION_KEYS:
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


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small, picklable decisions only)."""
    return collectives.broadcast_object(obj, src=0)


class CheckpointManager:
    """Saves and restores one run's checkpoints under ``run_dir/checkpoints``; all methods are collective."""

    def __init__(
        self,
        config: CheckpointConfig,
        run_dir: str | Path,
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        """``model_config``: the fields that define the architecture (JSON-able); a checkpoint whose
        recorded model config differs is refused, with the differing keys named."""
        self.config = config
        self.root = Path(run_dir) / "checkpoints"
        self.model_config = dict(model_config or {})
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Step whose complete checkpoint holds this process's current state: the one just loaded
        # or just saved. A second save at the same step (an interval save followed by a preemption
        # save, or a preemption right after resuming) would rewrite identical state, which on an
        # 11B model costs minutes of the grace period, so it is skipped. Steps count optimizer
        # updates, so an unchanged step means unchanged weights and optimizer state.
        self._on_disk_step: int | None = None
        best_path = self.root / BEST
        self.best: dict[str, dict[str, float | int]] = read_json(best_path) if best_path.is_file() else {}

    # ------------------------------------------------------------------ saving

    def due(self, step: int) -> bool:
        """Whether ``step`` is a regular checkpoint step (every ``config.interval`` steps)."""
        return step > 0 and step % self.config.interval == 0

    def describe(self, engine) -> dict[str, Any]:
        """The identity a checkpoint records and a resume must match."""
        shapes = _param_shapes(engine)
        return {
            "world_size": self.world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "precision": _precision(engine),
            "param_count": sum(int(torch.Size(s).numel()) for s in shapes.values()),
            "model_config": self.model_config,
        }

    def save(
        self,
        engine,
        step: int,
        trainer_state: Mapping[str, Any] | None = None,
        job_config: str | Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step-N`` on every rank; returns its folder once it is complete.

        ``trainer_state`` must be JSON-serialisable and the same on every rank (rank 0 writes it);
        ``step`` is added to it. ``job_config``: the resolved job config (YAML text or a mapping),
        stored as ``config.yaml`` so every checkpoint says exactly how it was trained.
        """
        final = self.root / step_tag(step)
        # Skipped only while `latest` names it: after an explicit resume from an older checkpoint
        # the save must run, so that the new commit outranks the abandoned continuation.
        if self._on_disk_step == step and read_marker(final) is not None and read_latest(self.root) == final.name:
            log.info("checkpoint %s already holds this exact state; not re-saving", final)
            return final
        state = dict(trainer_state or {})
        if state.setdefault("step", step) != step:
            raise ValueError(f"trainer_state['step'] is {state['step']} but saving step {step}")
        staging_tag = step_tag(step) + STAGING_SUFFIX
        staging = self.root / staging_tag

        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for path in remove_debris(self.root):
                log.warning("removed leftover of an interrupted save or deletion: %s", path)
        collectives.barrier()

        started = time.monotonic()
        error = None
        try:
            engine.save_checkpoint(str(self.root), tag=staging_tag,
                                   client_state={CLIENT_STEP_KEY: step}, save_latest=False)
            rng.save(staging, self.rank)
            # DeepSpeed's torch.save does not fsync; durability of this rank's shards is part of
            # what the success flag below vouches for.
            for path in glob.glob(str(staging / f"*zero_pp_rank_{self.rank}_*")):
                fsync_path(path)
            if self.rank == 0:
                meta = self.describe(engine)
                atomic_write_json(staging / TRAINER_STATE, state)
                atomic_write_json(staging / PARAMS, _param_shapes(engine))
                atomic_write_json(staging / OPTIMIZER_GROUPS, _group_hyperparameters(engine))
                if job_config is not None:
                    text = job_config if isinstance(job_config, str) else yaml.safe_dump(
                        dict(job_config), sort_keys=False)
                    atomic_write_text(staging / CONFIG, text)
        except Exception as err:  # reported collectively below, then re-raised on this rank
            error = err
        ok = collectives.all_reduce_flag(error is None, "min")
        if error is not None:
            raise CheckpointError(f"{staging}: rank {self.rank} failed to write its part: {error}") from error
        if ok == 0:
            raise CheckpointError(f"{staging}: another rank failed to write its part; checkpoint abandoned")

        outcome = None
        if self.rank == 0:
            try:
                self._commit(staging, final, step, meta)
            except Exception as err:
                outcome = f"{type(err).__name__}: {err}"
        outcome = _broadcast(outcome)
        if outcome is not None:
            raise CheckpointError(f"{final}: rank 0 could not commit the checkpoint: {outcome}")
        self._on_disk_step = step
        log.info("saved checkpoint %s in %.1fs", final, time.monotonic() - started)
        return final

    def _commit(self, staging: Path, final: Path, step: int, meta: dict[str, Any]) -> None:
        """Rank 0: make ``staging`` the official ``step-N`` (marker, rename, pointer), then rotate."""
        missing = [
            str(path.relative_to(staging))
            for r in range(self.world_size)
            for path in (rng.rank_file(staging, r),)
            if not path.is_file()
        ]
        if meta["zero_stage"] == 3:
            for r in range(self.world_size):
                if not glob.glob(str(staging / f"*zero_pp_rank_{r}_mp_rank_*_model_states.pt")):
                    missing.append(f"zero_pp_rank_{r}_*_model_states.pt")
                if not glob.glob(str(staging / f"*zero_pp_rank_{r}_mp_rank_*_optim_states.pt")):
                    missing.append(f"zero_pp_rank_{r}_*_optim_states.pt")
        if missing:
            raise CheckpointError(f"{staging}: files missing after every rank reported success: {missing}")
        fsync_path(staging)
        write_marker(staging, {**meta, "step": step, "time": time.time(),
                               "deepspeed_version": _deepspeed_version(), "torch_version": torch.__version__})
        if final.exists():
            # Re-saving a step (resumed from an older checkpoint, or the earlier step-N was from an
            # abandoned continuation). Between these two lines no step-N exists; `latest` then
            # names a missing folder and find_latest falls back to the newest other checkpoint.
            remove_checkpoint(final)
        os.replace(staging, final)
        fsync_path(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._apply_retention(protect=step)

    def _apply_retention(self, protect: int) -> None:
        steps = [info.step for info in by_commit_order(complete_checkpoints(self.root))]
        pinned = {int(entry["step"]) for entry in self.best.values()} if self.config.keep_best else set()
        for step in select_for_deletion(steps, self.config.keep_last, pinned, protect=(protect,)):
            path = self.root / step_tag(step)
            log.info("retention: deleting %s", path)
            remove_checkpoint(path)

    # ------------------------------------------------------------------ evaluation pins

    def record_eval(self, step: int, scores: Mapping[str, float]) -> list[str]:
        """Record higher-is-better primary metrics of ``step``; returns the tasks it improved.

        Call it on every rank with the same scores (rank 0 writes ``best.json`` and applies
        retention, the other ranks keep the same view). The checkpoint of a task's best step is
        never deleted. Evaluate on checkpoint steps (or save right away when this returns a
        non-empty list), otherwise the best weights were never written.
        """
        improved = []
        for task, score in scores.items():
            entry = self.best.get(task)
            if entry is None or float(score) > float(entry["score"]):
                self.best[task] = {"step": int(step), "score": float(score)}
                improved.append(task)
        if improved and self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.root / BEST, self.best)
        return improved

    # ------------------------------------------------------------------ resuming

    def find_resume_point(self, spec: str | None = None) -> ResumePoint | None:
        """Collective, cheap, and meant to run before the model is built: which checkpoint to resume.

        ``spec`` defaults to ``config.resume``. Returns None for ``"none"`` and for ``"auto"`` when
        there is no complete checkpoint. Checks what the markers alone can tell (completeness, model
        config, whether a different world size may be converted) so a wrong resume fails before an
        11B model is materialised; the engine-level checks follow in ``load``.
        """
        spec = spec or self.config.resume
        if spec == "none":
            return None
        choice: tuple = ("ok", None)
        if self.rank == 0:
            try:
                choice = ("ok", self._choose(spec))
            except CheckpointError as err:
                choice = ("error", str(err))
        choice = _broadcast(choice)
        if choice[0] == "error":
            raise CheckpointError(choice[1])
        if choice[1] is None:
            log.info("resume=%s: no complete checkpoint under %s, starting fresh", spec, self.root)
        return choice[1]

    def needs_universal(self, point: ResumePoint | None) -> bool:
        """Whether ``point`` was saved on a different number of ranks (loaded via a universal checkpoint)."""
        return point is not None and point.world_size != self.world_size

    def load(self, engine, point: ResumePoint) -> dict[str, Any]:
        """Collective: load ``point`` into a freshly initialised engine (module, optimizer, lr
        scheduler) and this rank's RNG; returns the trainer state saved with it.

        The checkpoint is checked against the engine (ZeRO stage, precision, parameter names and
        shapes) on rank 0 before the first shard is read; every rank raises the same
        ``CheckpointError`` when it does not fit. The engine must not have been saved from or
        stepped yet: ZeRO-3 loads into pristine partitions.
        """
        problems = None
        if self.rank == 0:
            problems = self._engine_problems(point, engine)
        problems = _broadcast(problems)
        if problems:
            raise CheckpointError(f"checkpoint {point.path} does not match this job:\n  - " + "\n  - ".join(problems))

        step_dir = Path(point.path)
        universal = self.needs_universal(point)
        if universal:
            log.info("%s was saved on %d ranks, resuming on %d: loading a universal checkpoint",
                     step_dir, point.world_size, self.world_size)
            ensure_universal(step_dir, self.config.conversion_timeout_s)
            load_dir, tag = step_dir, UNIVERSAL
        else:
            load_dir, tag = step_dir.parent, step_dir.name
        # DeepSpeed chooses native or universal loading by reading this config flag during
        # load_checkpoint (engine.load_universal_checkpoint()); for ZeRO-3 nothing at initialize
        # time depends on it, so setting it for this one call is equivalent to "checkpoint":
        # {"load_universal": true} in the ds_config, and works whichever way the config was built.
        previous = engine._config.load_universal_checkpoint
        engine._config.load_universal_checkpoint = universal
        own_flags = _implementation_flags(engine)
        try:
            load_path, client_state = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = previous
        if load_path is None:
            raise CheckpointError(f"{step_dir}: DeepSpeed found no checkpoint files to load")
        _restore_implementation_flags(engine, own_flags)
        if universal:
            _repair_universal_load(engine, read_json(step_dir / OPTIMIZER_GROUPS), step_dir)
        saved_step = (client_state or {}).get(CLIENT_STEP_KEY)
        if saved_step != point.step:
            raise CheckpointError(f"{step_dir}: DeepSpeed state is from step {saved_step}, marker says {point.step}")
        if not rng.load(step_dir, self.rank):
            log.warning("%s has no RNG state for rank %d (saved on %d ranks); keeping this rank's seeded "
                        "generators", step_dir, self.rank, point.world_size)
        self._on_disk_step = point.step
        log.info("resumed from %s (step %d)", step_dir, point.step)
        return read_json(step_dir / TRAINER_STATE)

    def _choose(self, spec: str) -> ResumePoint | None:
        """Rank 0: the folder ``spec`` names, checked as far as its marker allows."""
        info = checkpoint_to_load(self.root, spec)
        if info is None:
            return None
        step_dir, marker = info.path, info.marker
        pointer = read_latest(self.root)
        if spec == "auto" and pointer is not None and pointer != step_dir.name:
            log.warning("%s/latest names %r, which is missing, incomplete or older than %s; using %s",
                        self.root, pointer, step_dir.name, step_dir.name)
        problems = []
        if self.model_config:
            problems += compare_metadata(
                step_dir, {"model_config": marker.get("model_config")}, {"model_config": self.model_config})
        if marker.get("world_size") != self.world_size and self.config.convert_universal == "never" \
                and read_marker(step_dir / UNIVERSAL) is None:
            problems.append(
                f"world size: saved on {marker.get('world_size')} ranks, this job has {self.world_size}, "
                f"and checkpoint.convert_universal is 'never'; convert it first with "
                f"`hp-deepspeed convert-universal {step_dir}`")
        if problems:
            raise CheckpointError(f"checkpoint {step_dir} does not match this job:\n  - " + "\n  - ".join(problems))
        return ResumePoint(str(step_dir.resolve()), int(marker["step"]), int(marker["world_size"]), marker)

    def _engine_problems(self, point: ResumePoint, engine) -> list[str]:
        """Rank 0: what differs between the checkpoint and the built engine (empty when it fits)."""
        step_dir = Path(point.path)
        if read_marker(step_dir) is None:  # deleted or invalidated since find_resume_point
            return [f"{step_dir} is no longer a complete checkpoint"]
        problems = compare_metadata(step_dir, point.marker, self.describe(engine))
        if (step_dir / PARAMS).is_file():
            problems += compare_params(read_json(step_dir / PARAMS), _param_shapes(engine))
        return problems


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint chosen for resuming (picklable: rank 0 broadcasts it)."""

    path: str
    step: int
    world_size: int
    marker: dict


def write_marker(step_dir: Path, marker: dict[str, Any]) -> None:
    """The commit point of a save: once this file exists the folder is a checkpoint."""
    atomic_write_json(step_dir / MARKER, marker)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
