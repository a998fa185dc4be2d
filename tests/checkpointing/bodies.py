"""Rank functions for ``run_ranks``: each runs in every rank of a real gloo group.

They return plain data (tensors, floats, strings) for the pytest process to compare; asserts
inside them would only surface as a crashed rank, so they are kept to what a body cannot return.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from hp_deepspeed.checkpointing import CheckpointConfig, CheckpointError, CheckpointManager
from hp_deepspeed.checkpointing import manager as manager_module
from tests.checkpointing.toy import MODEL_CONFIG, make_engine, rng_fingerprint, seed, snapshot, train_step

# Higher is better. Best "a" is step 2, best "b" moves from step 4 to step 6: with keep_last=2 the
# saves at 2, 4, 6, 8 must end as {2 (pinned a), 6 (pinned b, recent), 8 (recent)}.
EVALS = {2: {"a": 0.9}, 4: {"a": 0.5, "b": 0.5}, 6: {"a": 0.6, "b": 0.7}, 8: {"a": 0.1, "b": 0.1}}
SAVE_UNTIL = 8
TOTAL_STEPS = 10


def config(async_save: str = "never") -> CheckpointConfig:
    return CheckpointConfig(interval=2, keep_last=2, keep_best=True, resume="auto", async_save=async_save)


def train_save_resume(run_dir: str) -> dict:
    """Train 10 steps saving at 2..8, then resume step 8 into fresh engines and replay 9..10."""
    seed(1)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    out: dict = {"fresh_start": manager.find_resume_point()}
    engine = make_engine(init_seed=0)
    losses = {}
    for step in range(1, TOTAL_STEPS + 1):
        losses[step] = train_step(engine, step)
        if step in EVALS:
            manager.record_eval(step, EVALS[step])
        if step <= SAVE_UNTIL and manager.due(step):
            manager.save(engine, step, {"sampler": {"offset": 4 * step}}, job_config={"toy": True})
            if step == SAVE_UNTIL:
                out["saved"] = snapshot(engine)
                out["saved_rng"] = rng_fingerprint()
                # A second save at the same step (interval save, then a preemption save) is a no-op.
                marker = os.path.join(run_dir, "checkpoints", f"step-{step}", "COMPLETE")
                before = os.stat(marker).st_mtime_ns
                manager.save(engine, step, {"sampler": {"offset": 4 * step}})
                out["double_save_skipped"] = os.stat(marker).st_mtime_ns == before
    out["losses"] = losses

    # A fresh process state: other initial weights and other generator states until the load.
    # As the trainer does: the resume point is chosen before the engine is built.
    seed(99)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    engine = make_engine(init_seed=123)
    out["trainer_state"] = manager.load(engine, point)
    out["resumed_rng"] = rng_fingerprint()
    out["resumed"] = snapshot(engine)
    out["replayed"] = {step: train_step(engine, step) for step in range(SAVE_UNTIL + 1, TOTAL_STEPS + 1)}

    # The reference for the 1-rank universal resume: the same continuation without dropout (a
    # 1-rank run cannot reproduce rank 1's dropout stream). Re-saving the step just resumed from
    # must be a no-op rather than a rewrite of a good checkpoint.
    engine = make_engine(dropout=0.0, init_seed=7)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    manager.load(engine, point)
    before = os.stat(os.path.join(point.path, "COMPLETE")).st_mtime_ns
    manager.save(engine, SAVE_UNTIL, {"sampler": {"offset": 4 * SAVE_UNTIL}})
    out["resave_skipped"] = os.stat(os.path.join(point.path, "COMPLETE")).st_mtime_ns == before
    out["no_dropout"] = {step: train_step(engine, step) for step in range(SAVE_UNTIL + 1, TOTAL_STEPS + 1)}
    out["no_dropout_after"] = snapshot(engine)
    return out


def crash_during_save(run_dir: str) -> None:
    """Resume, train to step 10, and die after every rank wrote its shards but before the marker.

    The whole job dies at that point, as on a node failure: rank 0 exits instead of writing the
    marker, rank 1 exits instead of waiting for rank 0's verdict.
    """
    seed(5)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    engine = make_engine()
    manager.load(engine, point)
    for step in range(SAVE_UNTIL + 1, TOTAL_STEPS + 1):
        train_step(engine, step)

    def die(*args, **kwargs):
        os._exit(17)

    if dist.get_rank() == 0:
        manager_module.write_marker = die
    else:
        manager_module._broadcast = die
    manager.save(engine, TOTAL_STEPS, {"sampler": {"offset": 4 * TOTAL_STEPS}})


def resume_on_one_rank(run_dir: str) -> dict:
    """1 rank: refuse a wrong model clearly, then resume the 2-rank checkpoint via universal."""
    out: dict = {}
    try:
        incomplete = os.path.join(run_dir, "checkpoints", "step-12")
        CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG).find_resume_point(incomplete)
        out["incomplete_error"] = None
    except CheckpointError as err:
        out["incomplete_error"] = str(err)
    try:
        # A different model config is refused before any engine exists.
        CheckpointManager(config(), run_dir, model_config={**MODEL_CONFIG, "hidden": 32}).find_resume_point()
        out["wrong_model_error"] = None
    except CheckpointError as err:
        out["wrong_model_error"] = str(err)
    try:
        # Same model config recorded, but the engine's parameters differ: caught at load time.
        manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
        manager.load(make_engine(hidden=32), manager.find_resume_point())
        out["wrong_shapes_error"] = None
    except CheckpointError as err:
        out["wrong_shapes_error"] = str(err)

    seed(42)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    engine = make_engine(dropout=0.0, init_seed=321)
    out["trainer_state"] = manager.load(engine, point)
    out["resumed_rng"] = rng_fingerprint()
    out["resumed"] = snapshot(engine)
    out["losses"] = {step: train_step(engine, step) for step in range(SAVE_UNTIL + 1, TOTAL_STEPS + 1)}
    out["after"] = snapshot(engine)
    # The first save after the crash on this (now 1-rank) run clears the crashed staging folder.
    out["saved_path"] = str(manager.save(engine, TOTAL_STEPS, {"sampler": {"offset": 4 * TOTAL_STEPS}}))
    return out



def resume_on_two_ranks(run_dir: str) -> dict:
    """2 ranks: resume the checkpoint the 1-rank run saved (1 -> 2 ranks, via universal)."""
    seed(7)
    engine = make_engine(dropout=0.0, init_seed=11)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    out = {"saved_on": point.world_size, "trainer_state": manager.load(engine, point)}
    out["resumed"] = snapshot(engine)
    return out


def resume_on_four_ranks(run_dir: str) -> dict:
    """4 ranks: resume the 2-rank checkpoint of step 8 (2 -> 4 ranks, via universal) and replay
    steps 9-10 without dropout, as the 2-rank reference continuation did."""
    seed(5)
    engine = make_engine(dropout=0.0, init_seed=13)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    out = {"saved_on": point.world_size, "step": point.step, "trainer_state": manager.load(engine, point)}
    out["resumed"] = snapshot(engine)
    out["losses"] = {step: train_step(engine, step) for step in range(SAVE_UNTIL + 1, TOTAL_STEPS + 1)}
    out["after"] = snapshot(engine)
    return out


def _record_fsyncs() -> list[str]:
    """From now on, every ``os.fsync`` of this rank, as the path its descriptor has open."""
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
        return real(fd)

    os.fsync = fsync
    return synced


def save_at_every_stage(run_dir: str, async_save: str = "never") -> dict:
    """One save of a real engine at ZeRO stages 0, 1, 2 and 3: every file the save left in the
    step folder, and the paths this rank fsynced before its part of the save was agreed on (rank 0:
    before it wrote ``COMPLETE``)."""
    synced = _record_fsyncs()
    out = {}
    for stage in (0, 1, 2, 3):
        seed(3)
        manager = CheckpointManager(config(async_save), os.path.join(run_dir, f"stage{stage}"),
                                    model_config=MODEL_CONFIG)
        engine = make_engine(stage=stage)
        train_step(engine, 1)
        del synced[:]
        step_dir = manager.save(engine, 1, {"sampler": {"offset": 4}}, job_config={"toy": True})
        marker = [i for i, path in enumerate(synced) if os.path.basename(path).startswith(".COMPLETE.")]
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names) \
            if dist.get_rank() == 0 else []
        out[stage] = {"files": files, "synced": synced[:marker[0]] if marker else list(synced),
                      "step_dir": str(step_dir)}
        dist.barrier()
    return out


def one_rank_cannot_write(run_dir: str) -> dict:
    """Save step 2, then save step 4 while rank 1's file size limit (a real kernel fault at the
    real write: EFBIG, as a quota or a full disk would fail it) stops its shards; every rank must
    learn it at the agreement point and raise the same error, quickly."""
    import resource
    import signal
    import time

    seed(4)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    engine = make_engine()
    train_step(engine, 1)
    manager.save(engine, 2)
    train_step(engine, 2)
    if dist.get_rank() == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
    started = time.monotonic()
    try:
        manager.save(engine, 4)
        error = None
    except CheckpointError as err:
        error = str(err)
    took = time.monotonic() - started
    if dist.get_rank() == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return {"error": error, "seconds": took}


def every_stage_then_a_failed_write(run_dir: str) -> dict:
    """Both of the above in one pair of processes (starting ranks costs more than the saves)."""
    return {"stages": save_at_every_stage(os.path.join(run_dir, "stages")),
            "failed": one_rank_cannot_write(os.path.join(run_dir, "failed"))}
