"""The asynchronous save (``checkpoint.async_save``) on a real ZeRO-3 engine over 2 gloo ranks.

One pair of processes (``async_saves``) runs every case: starting two ranks costs more than the
saves. The writer thread is slowed down, so training has mutated the weights before a single
byte of the checkpoint is written: what lands on disk must still be the state at ``save``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import xxhash

from hp_deepspeed.checkpointing import CheckpointError, CheckpointManager
from hp_deepspeed.checkpointing.async_save import HostSnapshot
from hp_deepspeed.checkpointing.integrity import SaveLedger
from hp_deepspeed.checkpointing.layout import MARKER, read_latest, read_marker
from hp_deepspeed.testing.ranks import run_ranks
from tests.checkpointing.bodies import config, save_at_every_stage
from tests.checkpointing.test_durability import fsync_record
from tests.checkpointing.toy import MODEL_CONFIG, make_engine, seed, snapshot, train_step

WRITER_DELAY_S = 0.5


def _file_digests(step_dir: str) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(step_dir):
        for name in names:
            path = Path(folder) / name
            # The marker holds the commit time; the RNG file is written by another path in each mode
            # (and the manifest holds its digest): both are checked by the resume below.
            if name not in (MARKER, "manifest.json") and Path(folder).name != "rng":
                out[str(path.relative_to(step_dir))] = xxhash.xxh3_128(path.read_bytes()).hexdigest()
    return out


def _slow_writer():
    """Every file the background thread writes starts WRITER_DELAY_S late; returns the undo."""
    real = SaveLedger.torch_save

    def torch_save(self, obj, path):
        import threading

        if threading.current_thread() is not threading.main_thread():
            time.sleep(WRITER_DELAY_S)
        return real(self, obj, path)

    SaveLedger.torch_save = torch_save
    return lambda: setattr(SaveLedger, "torch_save", real)


def async_saves(run_dir: str) -> dict:
    import resource
    import signal

    out: dict = {}
    seed(2)
    engine = make_engine(init_seed=0)
    losses = {step: train_step(engine, step) for step in (1, 2)}
    saved = snapshot(engine)
    sync_dir = CheckpointManager(config("never"), os.path.join(run_dir, "sync"), model_config=MODEL_CONFIG).save(
        engine, 2, {"sampler": {"offset": 8}}, job_config={"toy": True})

    undo = _slow_writer()
    manager = CheckpointManager(config("always"), os.path.join(run_dir, "async"), model_config=MODEL_CONFIG)
    started = time.monotonic()
    async_dir = manager.save(engine, 2, {"sampler": {"offset": 8}}, job_config={"toy": True}, wait=False)
    out["returned_after_s"] = time.monotonic() - started
    out["official_on_return"] = read_marker(async_dir) is not None
    losses[3] = train_step(engine, 3)  # updates the weights and moments in place, before the write
    manager.wait()
    undo()
    out["official_after_wait"] = read_marker(async_dir) is not None and read_latest(async_dir.parent) == "step-2"
    if dist.get_rank() == 0:
        out["sync_files"], out["async_files"] = _file_digests(str(sync_dir)), _file_digests(str(async_dir))

    # Exact resume from the background-written checkpoint, into other initial weights.
    seed(77)
    manager = CheckpointManager(config("always"), os.path.join(run_dir, "async"), model_config=MODEL_CONFIG)
    engine = make_engine(init_seed=123)
    manager.load(engine, manager.find_resume_point())
    out["resumed_equal"] = all(torch.equal(saved[key], value) for key, value in snapshot(engine).items())
    out["replayed_equal"] = train_step(engine, 3) == losses[3]

    # A background write fails on rank 1 (EFBIG, a real kernel fault): save() returns, the next
    # wait raises the same error on every rank, and step-2 stays the checkpoint to resume from.
    train_step(engine, 4)
    if dist.get_rank() == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
    try:
        manager.save(engine, 4, {"sampler": {"offset": 16}}, wait=False)
        out["failed_save_returned"] = True
        manager.wait()
        out["error"] = None
    except CheckpointError as err:
        out["error"] = str(err)
    if dist.get_rank() == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    dist.barrier()
    out["latest_after_failure"] = read_latest(Path(run_dir, "async", "checkpoints"))

    # The save a process exits after (the last one, a preemption's) is official when it returns.
    final = manager.save(engine, 4, {"sampler": {"offset": 16}}, wait=True)
    out["last_official_on_return"] = read_marker(final) is not None and read_latest(final.parent) == "step-4"

    out["stages"] = save_at_every_stage(os.path.join(run_dir, "stages"), async_save="always")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async")
    return run_dir, run_ranks("tests.checkpointing.test_async_save:async_saves", 2, timeout=300, args=(str(run_dir),))


@pytest.mark.distributed
def test_an_async_save_writes_the_state_at_save_time_byte_for_byte_as_a_synchronous_save(results):
    _, ranks = results
    assert all(not rank["official_on_return"] and rank["official_after_wait"] for rank in ranks)
    assert all(rank["returned_after_s"] < WRITER_DELAY_S for rank in ranks)  # the writes came later
    sync_files, async_files = ranks[0]["sync_files"], ranks[0]["async_files"]
    assert any(rel.startswith("zero_pp_rank_1_") for rel in async_files)
    assert async_files == sync_files


@pytest.mark.distributed
def test_a_resume_from_an_async_save_is_exact(results):
    _, ranks = results
    assert all(rank["resumed_equal"] and rank["replayed_equal"] for rank in ranks)


@pytest.mark.distributed
def test_a_failed_background_write_abandons_the_save_on_every_rank_with_one_line(results):
    run_dir, ranks = results
    root = run_dir / "async" / "checkpoints"
    assert all(rank["failed_save_returned"] for rank in ranks)
    errors = [rank["error"] for rank in ranks]
    assert errors[0] == errors[1] and errors[0] is not None
    lines = errors[0].splitlines()
    assert lines[0] == "checkpoint step-4 not saved (step-2 stays the checkpoint to resume from):"
    assert len(lines) == 2, errors[0]
    assert lines[1].startswith(f"  - rank 1 could not write {root}/step-4.staging/")
    assert lines[1].endswith(": file too large"), lines[1]
    assert [rank["latest_after_failure"] for rank in ranks] == ["step-2", "step-2"]


@pytest.mark.distributed
def test_a_save_that_waits_is_official_on_every_rank_when_it_returns(results):
    _, ranks = results
    assert all(rank["last_official_on_return"] for rank in ranks)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_file_an_async_save_writes_is_fsynced_before_complete(results, stage):
    _, ranks = results
    files, folders, synced = fsync_record(ranks, stage)
    assert files and [path for path in files if path not in synced] == []
    assert folders <= synced


def test_a_host_snapshot_keeps_shared_storage_and_ignores_later_in_place_updates(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    weight = torch.nn.Parameter(flat[:6].view(2, 3), requires_grad=False)
    state = {"flat": flat, "views": [weight, flat[6:]], "same": flat, "step": (3, "x")}
    (tmp_path / "live").mkdir()
    (tmp_path / "copy").mkdir()  # torch names the archive's records after the file: one name
    torch.save(state, tmp_path / "live" / "state.pt")
    snapshot = HostSnapshot()
    copied, ready = snapshot.take(state)
    assert ready is None
    flat.add_(100.0)  # training's in-place update, after the snapshot
    torch.save(copied, tmp_path / "copy" / "state.pt")
    assert (tmp_path / "copy" / "state.pt").read_bytes() == (tmp_path / "live" / "state.pt").read_bytes()
    loaded = torch.load(tmp_path / "copy" / "state.pt", weights_only=False)
    assert loaded["views"][0].untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    # Once written, the next save copies into the same buffer, and sees the new values.
    buffer = copied["flat"].untyped_storage().data_ptr()
    snapshot.recycle()
    again, _ = snapshot.take(state)
    assert again["flat"].untyped_storage().data_ptr() == buffer and torch.equal(again["flat"], flat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: pinned host buffers, side-stream copies")
def test_a_host_snapshot_of_gpu_tensors_is_pinned_complete_and_reused(tmp_path):
    flat = torch.randn(1 << 20, device="cuda")
    state = {"flat": flat, "view": flat[10:20], "step": torch.tensor(3.0)}
    (tmp_path / "live").mkdir()
    (tmp_path / "copy").mkdir()
    torch.save({k: v.cpu() if v.is_cuda else v for k, v in state.items()}, tmp_path / "live" / "state.pt")
    snapshot = HostSnapshot()
    copied, ready = snapshot.take(state)
    flat.mul_(-1.0)  # queued on the training stream behind the copies
    ready.synchronize()
    assert copied["flat"].is_pinned() and not copied["flat"].is_cuda
    assert copied["view"].untyped_storage().data_ptr() == copied["flat"].untyped_storage().data_ptr()
    assert torch.equal(copied["flat"].cuda(), -flat)
    torch.save(copied, tmp_path / "copy" / "state.pt")
    # The view's storage offset and the CPU tensor survive, so a load gives the same values.
    loaded = torch.load(tmp_path / "copy" / "state.pt")
    reference = torch.load(tmp_path / "live" / "state.pt")
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    buffer = copied["flat"].untyped_storage().data_ptr()
    del copied
    snapshot.recycle()
    again, ready = snapshot.take(state)
    ready.synchronize()
    assert again["flat"].untyped_storage().data_ptr() == buffer  # the pinned buffer was reused


@pytest.mark.slow
def test_a_trainer_whose_background_save_fails_stops_with_one_line_and_no_partial_checkpoint(tmp_path):
    # The run dir's own files fit in 1 MiB, the first checkpoint (~5 MB) does not: the interval
    # save at step 2 fails in the background, and the save at step 4 reports it.
    from tests.test_faults_cli import error_line, tmpfs, train

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        result = train(disk / "run", "training.steps=4", "checkpoint.interval=2", "checkpoint.async_save=always")
        assert result.returncode != 0, result.output[-3000:]
        line = error_line(result)
        assert "error: checkpoint step-2 not saved (no earlier checkpoint exists): rank 0 could not write" in line, line
        assert line.endswith(": no space left on device"), line
        assert not list((disk / "run" / "checkpoints").glob("*.staging"))
        assert not (disk / "run" / "checkpoints" / "latest").exists()
