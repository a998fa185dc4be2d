"""``CheckpointManager``: save, rotate, verify and resume a DeepSpeed run as crash-safe ``step-N`` folders.

The trainer (hp_deepspeed/training/trainer.py) owns one manager and calls, on every rank:

    manager = CheckpointManager(cfg.checkpoint, run_dir, model_config=architecture)
    point = manager.find_resume_point(cfg.checkpoint.resume)  # before building the model: the
                                                              # newest checkpoint that verifies
    engine = deepspeed.initialize(...)
    state = manager.load(engine, point) if point else None    # module, optimizer, scheduler, RNG;
                                                              # universal when the world size changed
    ...
    improved = manager.record_eval(step, {"glue/rte": 71.2})  # higher is better; pins the best per task
    if manager.due(step) or last or improved or stopping:
        manager.save(engine, step, {"step": step, "data": stream.state_dict()}, to_dict(cfg))

Save protocol (see ``layout`` for the folder layout, ``integrity`` for the files):
 1. rank 0 removes debris of earlier crashed saves; barrier.
 2. every rank writes its DeepSpeed shards (``engine.save_checkpoint`` into ``step-N.staging``,
    each file routed through this rank's ``SaveLedger``: fsynced, size and digest recorded, a
    failure recorded instead of raised inside DeepSpeed's barriers) and its RNG file; rank 0
    adds trainer_state.json, config.yaml, params.json, optimizer_groups.json.
 3. every rank's report (its files, or what failed, with rank, file and OS error) is gathered on
    every rank: the agreement point. A failure anywhere abandons the save on every rank at once,
    with one line per distinct cause; rank 0 removes the staging folder, ``latest`` is untouched.
 4. rank 0 checks every rank's files are present, writes ``manifest.json`` (every file's size and
    digest), fsyncs every directory, writes ``COMPLETE`` (holding the manifest's digest), renames
    the folder to ``step-N``, atomically repoints ``latest``, then applies retention. Rank 0's
    outcome is broadcast so every rank returns (or raises) together: a rank that exits right
    after ``save`` (preemption) does so only once the checkpoint is official.

Asynchronous save (``checkpoint.async_save``, see ``async_save``): in step 2 each file DeepSpeed
hands over is copied to host memory and queued, and ``save(..., wait=False)`` returns once all
are copied; a background thread per rank writes them through the same ledger, then runs steps 3
and 4 over a gloo group of their own. Only one save is in flight: the next ``save`` first waits
for the previous one and raises its ``CheckpointError``, as does ``wait()``. The trainer waits at
the last save, at a preemption save and on every way out of the loop, so the contract above
holds: a process that exits after such a save leaves an official checkpoint. A crash during the
background write leaves a ``.staging`` folder, removed as debris by the next save.

Resume: rank 0 lists the candidates from the markers; every rank checks its share of each
candidate's files against the manifest until one verifies; a candidate that fails is skipped with
one warning naming the file and the step used instead. Checking is the resume's only read of the
files a rank loads (same world size): they are read into memory as they are hashed, and ``load``
hands that verified copy to DeepSpeed, so nothing is trusted before every rank's digests matched
and nothing is read twice.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import yaml

from hp_deepspeed.checkpointing import data_files as data_record
from hp_deepspeed.checkpointing import rng
from hp_deepspeed.checkpointing.async_save import BackgroundSave, HostSnapshot
from hp_deepspeed.checkpointing.config import CheckpointConfig
from hp_deepspeed.checkpointing.integrity import (
    MANIFEST,
    RankReport,
    SaveLedger,
    assemble_manifest,
    failure_lines,
    fsync_tree,
    manifest_text,
    text_digest,
    verify,
)
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
    CheckpointInfo,
    compare_metadata,
    compare_params,
    complete_checkpoints,
    fsync_path,
    read_json,
    read_latest,
    read_marker,
    remove_checkpoint,
    remove_debris,
    resume_candidates,
    retire_checkpoint,
    select_for_deletion,
    step_tag,
)
from hp_deepspeed.checkpointing.universal import ensure_universal
from hp_deepspeed.compat.checkpoint import (
    ParamGroupMismatch,
    base_optimizer,
    implementation_flags,
    mmap_loading,
    own_step,  # noqa: F401  (re-exported: the GPU rule tests import it from here)
    repair_universal_load,
    restore_implementation_flags,
    route_checkpoint_writes,
    universal_loading,
)
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


def _group_hyperparameters(engine) -> list[dict[str, Any]]:
    """Each optimizer param group's scalar settings (lr, betas, weight_decay, ...), JSON-able."""
    def plain(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params" and plain(v)}
            for group in base_optimizer(engine).param_groups]


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _broadcast(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (small, picklable decisions only); ``group``: a background
    save's own group, None for the training's."""
    if group is None:
        return collectives.broadcast_object(obj, src=0)
    return collectives.broadcast_object(obj, src=0, group=group)


def _gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (see ``_broadcast`` for ``group``)."""
    if group is None:
        return collectives.all_gather_objects(obj)
    return collectives.all_gather_objects(obj, group=group)


class CheckpointManager:
    """Saves and restores one run's checkpoints under ``run_dir/checkpoints``; all methods are collective."""

    def __init__(
        self,
        config: CheckpointConfig,
        run_dir: str | Path,
        model_config: Mapping[str, Any] | None = None,
        data_files: Mapping[str, str | Path] | None = None,
    ) -> None:
        """``model_config``: the fields that define the architecture (JSON-able); a checkpoint whose
        recorded model config differs is refused, with the differing keys named. ``data_files``:
        task -> training file; a checkpoint records them (``data_files`` module) and a resume
        refuses files changed since, unless ``config.accept_changed_data``."""
        self.config = config
        self.data_files = {task: str(path) for task, path in (data_files or {}).items()}
        self._data_records: dict[str, dict[str, Any]] = {}
        # Retention's file deletions (an 11B checkpoint is ~10% of a save's time to delete) run
        # here, after the old checkpoints were retired; joined before the next save and, being a
        # non-daemon thread, before the interpreter exits.
        self._deleting: threading.Thread | None = None
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
        mode = config.async_save
        self._async = mode == "always" or (mode == "auto" and torch.cuda.is_available())
        if self._async:
            # Created here, where every rank constructs its manager, since creating a group is
            # collective. Not kept: a group's threads end only when its last reference goes, at
            # the exit's ``shutdown_distributed``; the save looks it up when it needs it.
            collectives.background_group()
        self._snapshot = HostSnapshot()
        self._in_flight: BackgroundSave | None = None
        # (step folder, real path -> HeldFile): the files of the checkpoint find_resume_point
        # chose, as it read and verified them, until ``load`` uses them.
        self._held: tuple[str, dict] | None = None

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
        wait: bool = True,
    ) -> Path:
        """Write checkpoint ``step-N`` on every rank; returns its folder.

        ``trainer_state`` must be JSON-serialisable and the same on every rank (rank 0 writes it);
        ``step`` is added to it. ``job_config``: the resolved job config (YAML text or a mapping),
        stored as ``config.yaml`` so every checkpoint says exactly how it was trained.

        ``wait``: return only once the checkpoint is complete (always so for a synchronous save).
        With ``config.async_save`` and ``wait=False`` it returns once the state is copied to host
        memory; the files are written and committed in the background, and :meth:`wait` (called
        by the next save too) returns once that is done or raises its ``CheckpointError``.
        """
        self.wait()  # one save in flight; the previous one's failure is reported here
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

        started = time.monotonic()
        ledger = SaveLedger(staging, self.rank)
        if self.rank == 0:
            self.finish_deletions()
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for path in remove_debris(self.root):
                    log.warning("removed leftover of an interrupted save or deletion: %s", path)
            except OSError as err:
                ledger.fail(self.root, err)
        # Nobody writes before the debris is gone; and a run dir rank 0 cannot write to stops
        # every rank here, before DeepSpeed's collectives.
        prepared = collectives.all_gather_objects(ledger.report.failures)
        if prepared[0]:
            raise CheckpointError(f"checkpoint {final.name} not saved:\n  - " + "\n  - ".join(failure_lines(prepared[0])))

        background = BackgroundSave(ledger, self._snapshot) if self._async else None
        writer = background or ledger  # both take torch_save and write_text
        meta = None
        try:
            with route_checkpoint_writes(engine, writer.torch_save, ledger.guard):
                engine.save_checkpoint(str(self.root), tag=staging_tag,
                                       client_state={CLIENT_STEP_KEY: step}, save_latest=False)
            rng_file = rng.rank_file(staging, self.rank)
            if background is not None:  # written, or skipped after a failed write, by the thread
                background.torch_save(rng.capture(), rng_file)
            elif not ledger.failed:  # after a failed write, more writes only repeat its cause
                ledger.guard(rng_file, lambda: ledger.adopt(rng.save(staging, self.rank)))
            if self.rank == 0 and not ledger.failed:
                meta = {**self.describe(engine), "data_files": self._record_data_files()}
                writer.write_text(staging / TRAINER_STATE, _json_text(state))
                writer.write_text(staging / PARAMS, _json_text(_param_shapes(engine)))
                writer.write_text(staging / OPTIMIZER_GROUPS, _json_text(_group_hyperparameters(engine)))
                if job_config is not None:
                    text = job_config if isinstance(job_config, str) else yaml.safe_dump(
                        dict(job_config), sort_keys=False)
                    writer.write_text(staging / CONFIG, text)
        except Exception as err:  # raised by DeepSpeed's own code, not by a write: reported like one
            ledger.fail(staging, err)
        except BaseException:
            if background is not None:  # an interrupt: the thread stops after the queued writes
                background.close(None)
            raise
        # Retention after this commit pins the best steps known now, whatever is recorded meanwhile.
        best = {task: dict(entry) for task, entry in self.best.items()}
        if background is None:
            self._agree_and_commit(ledger, staging, final, step, meta, best, started, group=None)
            return final
        background.close(lambda: self._agree_and_commit(ledger, staging, final, step, meta, best, started,
                                                        group=collectives.background_group()))
        self._in_flight = background
        log.debug("checkpoint %s copied to host memory in %.2fs; writing it in the background",
                  final.name, time.monotonic() - started)
        if wait:
            self.wait()
        return final

    def wait(self) -> None:
        """Collective: return once the save in flight (if any) is complete, or raise its error.

        The same ``CheckpointError`` is raised on every rank: the agreement and commit that decide
        it ran on every rank. A no-op for a synchronous save, which is complete when it returns."""
        background, self._in_flight = self._in_flight, None
        if background is None:
            return
        error = background.join()
        if error is not None:
            raise error

    def _agree_and_commit(self, ledger: SaveLedger, staging: Path, final: Path, step: int,
                          meta: dict[str, Any] | None, best: dict, started: float, group: Any) -> None:
        """Steps 3 and 4 of the protocol; ``group``: the collectives' group (a background save's own)."""
        # The agreement point: every rank learns what every other rank wrote, or why it could not.
        reports: list[RankReport] = _gather(ledger.report, group)
        failures = [failure for report in reports for failure in report.failures]
        if failures:
            if self.rank == 0:  # nobody writes into it any more; a full disk is not left fuller
                shutil.rmtree(staging, ignore_errors=True)
            previous = read_latest(self.root)
            keeps = f"{previous} stays the checkpoint to resume from" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"checkpoint {final.name} not saved ({keeps}):\n  - " + "\n  - ".join(failure_lines(failures)))

        outcome = None
        if self.rank == 0:
            try:
                self._commit(staging, final, step, meta, reports, best)
            except Exception as err:
                outcome = f"{type(err).__name__}: {err}"
        outcome = _broadcast(outcome, group)
        if outcome is not None:
            raise CheckpointError(f"{final}: rank 0 could not commit the checkpoint: {outcome}")
        self._on_disk_step = step
        log.info("saved checkpoint %s in %.1fs%s", final, time.monotonic() - started,
                 " (in the background)" if group is not None else "")

    def _record_data_files(self) -> dict[str, dict[str, Any]]:
        """Rank 0: the training files' records (read once, then re-read only when size or mtime move)."""
        records = {}
        for task, path in self.data_files.items():
            try:
                records[task] = data_record.describe(path, self._data_records.get(task))
            except OSError as err:  # the save still holds the model; the resume check has less to compare
                log.warning("checkpoint cannot record training file %s: %s", path, err)
        self._data_records = records
        return records

    def _commit(self, staging: Path, final: Path, step: int, meta: dict[str, Any], reports: list[RankReport],
                best: Mapping[str, Mapping[str, Any]]) -> None:
        """Rank 0: make ``staging`` the official ``step-N`` (manifest, marker, rename, pointer), then rotate."""
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
        # A rank that wrote to a node-local disk reports files rank 0 cannot see.
        missing += [rel for report in reports for rel in report.files
                    if not (staging / rel).is_file() and rel not in missing]
        if missing:
            raise CheckpointError(f"{staging}: files missing after every rank reported success: {missing}")
        adopted = SaveLedger(staging, self.rank)
        manifest = assemble_manifest(staging, reports, adopted)
        if adopted.failed:
            raise CheckpointError("; ".join(failure_lines(adopted.report.failures)))
        text = manifest_text(manifest)
        atomic_write_text(staging / MANIFEST, text)
        fsync_tree(staging)  # every directory entry of every file, before the marker vouches for them
        write_marker(staging, {**meta, "step": step, "time": time.time(), "manifest": text_digest(text),
                               "deepspeed_version": _deepspeed_version(), "torch_version": torch.__version__})
        if final.exists():
            # Re-saving a step (resumed from an older checkpoint, or the earlier step-N was from an
            # abandoned continuation). Between these two lines no step-N exists; `latest` then
            # names a missing folder and find_latest falls back to the newest other checkpoint.
            remove_checkpoint(final)
        os.replace(staging, final)
        fsync_path(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._apply_retention(protect=step, best=best)

    def _apply_retention(self, protect: int, best: Mapping[str, Mapping[str, Any]]) -> None:
        """Retire the checkpoints retention drops now; delete their files in the background."""
        steps = [info.step for info in by_commit_order(complete_checkpoints(self.root))]
        pinned = {int(entry["step"]) for entry in best.values()} if self.config.keep_best else set()
        trash = []
        for step in select_for_deletion(steps, self.config.keep_last, pinned, protect=(protect,)):
            path = self.root / step_tag(step)
            log.info("retention: deleting %s", path)
            trash.append(retire_checkpoint(path))
        if trash:
            self.finish_deletions()
            self._deleting = threading.Thread(target=delete_trees, args=(trash,), name="checkpoint-retention")
            self._deleting.start()

    def finish_deletions(self) -> None:
        """Wait for retention's background deletions (rank 0; a no-op elsewhere)."""
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None

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
        """Collective, and meant to run before the model is built: which checkpoint to resume.

        ``spec`` defaults to ``config.resume``. Returns None for ``"none"`` and for ``"auto"`` when
        there is no complete checkpoint. The candidate's files are checked against its manifest
        (every rank reads its share); with ``"auto"`` one that fails is skipped with one warning
        naming the file and the step used instead, and when none verifies the error names each.
        Then what the marker alone can tell (model config, whether a different world size may be
        converted) is checked, so a wrong resume fails before an 11B model is materialised; the
        engine-level checks follow in ``load``.
        """
        spec = spec or self.config.resume
        if spec == "none":
            return None
        listing: tuple = ("ok", [])
        if self.rank == 0:
            try:
                listing = ("ok", resume_candidates(self.root, spec))
            except CheckpointError as err:
                listing = ("error", str(err))
        listing = _broadcast(listing)
        if listing[0] == "error":
            raise CheckpointError(listing[1])
        candidates: list[CheckpointInfo] = listing[1]
        if not candidates:
            log.info("resume=%s: no complete checkpoint under %s, starting fresh", spec, self.root)
            return None
        chosen, skipped = self._first_verified(candidates)
        if chosen is None:
            if spec != "auto":
                raise CheckpointError(f"{skipped[0][0].path} fails verification: {skipped[0][1]}")
            raise CheckpointError(f"{self.root}: no checkpoint passes verification: "
                                  + "; ".join(f"{info.path.name}: {problem}" for info, problem in skipped))
        choice: tuple = ("ok", None)
        if self.rank == 0:
            for info, problem in skipped:
                log.warning("checkpoint %s fails verification (%s); resuming from %s instead",
                            info.path.name, problem, chosen.path.name)
            try:
                choice = ("ok", self._check(chosen, spec, warn_pointer=not skipped))
            except CheckpointError as err:
                choice = ("error", str(err))
        choice = _broadcast(choice)
        if choice[0] == "error":
            raise CheckpointError(choice[1])
        return choice[1]

    def _first_verified(self, candidates: list[CheckpointInfo]) -> tuple[CheckpointInfo | None, list]:
        """The first candidate whose files all match its manifest, every rank checking its share;
        and the (candidate, first problem) pairs skipped before it."""
        skipped = []
        self._held = None
        for info in candidates:
            # Saved on as many ranks: each rank loads the files it wrote and checks, so it keeps
            # the copy it verified for ``load`` (see ``preload``). Otherwise it only hashes them.
            held: dict | None = {} if info.marker.get("world_size") == self.world_size else None
            problem = verify(info.path, info.marker, self.rank, self.world_size, held=held)
            problems = [p for p in collectives.all_gather_objects(problem) if p]
            if not problems:
                self._held = (str(Path(info.path).resolve()), held or {})
                return info, skipped
            skipped.append((info, problems[0]))
        return None, skipped

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
        # What find_resume_point read and verified; taken here so that it is freed with this
        # call, whatever happens: the engine keeps what it adopts, the rest goes.
        where, held = self._held or ("", {})
        self._held = None
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
        own_flags = implementation_flags(engine)
        # The files find_resume_point read and verified are loaded from that copy; any other file
        # is memory-mapped (verification just brought it into the page cache).
        if universal or where != str(step_dir.resolve()):
            held = {}
        with universal_loading(engine, universal), mmap_loading(engine, held):
            load_path, client_state = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{step_dir}: DeepSpeed found no checkpoint files to load")
        restore_implementation_flags(engine, own_flags)
        if universal:
            try:
                repair_universal_load(engine, read_json(step_dir / OPTIMIZER_GROUPS), step_dir)
            except ParamGroupMismatch as err:
                raise CheckpointError(str(err)) from None
        saved_step = (client_state or {}).get(CLIENT_STEP_KEY)
        if saved_step != point.step:
            raise CheckpointError(f"{step_dir}: DeepSpeed state is from step {saved_step}, marker says {point.step}")
        if not rng.load(step_dir, self.rank):
            log.warning("%s has no RNG state for rank %d (saved on %d ranks); keeping this rank's seeded "
                        "generators", step_dir, self.rank, point.world_size)
        self._on_disk_step = point.step
        log.debug("loaded %s (step %d)", step_dir, point.step)  # the trainer says "resumed from", once
        return read_json(step_dir / TRAINER_STATE)

    def _check(self, info: CheckpointInfo, spec: str, warn_pointer: bool) -> ResumePoint:
        """Rank 0: the verified checkpoint ``info``, checked as far as its marker allows."""
        step_dir, marker = info.path, info.marker
        pointer = read_latest(self.root)
        if spec == "auto" and warn_pointer and pointer is not None and pointer != step_dir.name:
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
        changed = data_record.changes(marker.get("data_files") or {}, self.data_files)
        if changed and self.config.accept_changed_data:
            log.warning("resuming %s with changed training data (checkpoint.accept_changed_data): %s",
                        step_dir, "; ".join(changed))
        elif changed:
            problems += [f"{change}; set checkpoint.accept_changed_data=true to resume anyway" for change in changed]
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


def delete_trees(folders: list[Path]) -> None:
    """Remove retired checkpoints; a failure is a warning (``remove_debris`` retries at the next save)."""
    for folder in folders:
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:  # another process's remove_debris got there first
            pass
        except OSError as err:
            log.warning("retention: could not delete %s: %s", folder, err)


def write_marker(step_dir: Path, marker: dict[str, Any]) -> None:
    """The commit point of a save: once this file exists the folder is a checkpoint."""
    atomic_write_json(step_dir / MARKER, marker)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
