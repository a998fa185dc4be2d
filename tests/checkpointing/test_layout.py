"""The single-process rules of the checkpoint layout: which folder counts, which gets deleted."""

from __future__ import annotations

import json

import pytest

from hp_deepspeed.checkpointing import CheckpointConfig, CheckpointError, convert_to_universal
from hp_deepspeed.checkpointing.layout import (
    LATEST,
    MARKER,
    atomic_write_text,
    by_commit_order,
    compare_metadata,
    complete_checkpoints,
    find_latest,
    remove_checkpoint,
    remove_debris,
    select_for_deletion,
)
from hp_deepspeed.config import ConfigError, from_dict


def make_checkpoint(root, step, saved_at=None, complete=True):
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "shard.pt").write_bytes(b"x")
    if complete:
        marker = {"step": step, "world_size": 2, "time": saved_at if saved_at is not None else float(step)}
        (folder / MARKER).write_text(json.dumps(marker))
    return folder


def test_deletion_keeps_last_k_pins_and_the_protected_step():
    assert select_for_deletion([2, 4, 6, 8], keep_last=2, pinned=[]) == [2, 4]
    assert select_for_deletion([2, 4, 6, 8], keep_last=2, pinned=[2, 6]) == [4]
    assert select_for_deletion([2, 4, 8], keep_last=1, pinned=[], protect=[4]) == [2]
    assert select_for_deletion([2, 4], keep_last=5, pinned=[]) == []
    # A pin on a step that was never saved keeps nothing extra and deletes nothing wrongly.
    assert select_for_deletion([2, 4, 6], keep_last=1, pinned=[5]) == [2, 4]


def test_retention_rotates_out_an_abandoned_continuation_first(tmp_path):
    # Run reached step 10, was resumed on purpose from step 4, and has since saved 6 and 8.
    for step, saved_at in ((4, 1.0), (10, 2.0), (6, 3.0), (8, 4.0)):
        make_checkpoint(tmp_path, step, saved_at=saved_at)
    order = [info.step for info in by_commit_order(complete_checkpoints(tmp_path))]
    assert order == [4, 10, 6, 8]
    assert select_for_deletion(order, keep_last=2, pinned=[]) == [4, 10]


def test_only_marked_step_folders_are_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False)
    staging = make_checkpoint(tmp_path, 6)
    staging.rename(tmp_path / "step-6.staging")
    (tmp_path / "step-x").mkdir()
    assert [info.step for info in complete_checkpoints(tmp_path)] == [2]
    assert find_latest(tmp_path).step == 2


def test_latest_pointer_is_used_when_valid_and_bypassed_when_stale(tmp_path):
    assert find_latest(tmp_path) is None
    make_checkpoint(tmp_path, 2, saved_at=1.0)
    make_checkpoint(tmp_path, 4, saved_at=2.0)
    assert find_latest(tmp_path).step == 4  # no pointer: scan
    (tmp_path / LATEST).write_text("step-4\n")
    assert find_latest(tmp_path).step == 4
    # Died after renaming step-6 into place but before updating the pointer: the newer one wins.
    make_checkpoint(tmp_path, 6, saved_at=3.0)
    assert find_latest(tmp_path).step == 6
    # Pointer names a folder that lost its marker (deletion in progress): newest complete instead.
    (tmp_path / LATEST).write_text("step-6\n")
    (tmp_path / "step-6" / MARKER).unlink()
    assert find_latest(tmp_path).step == 4


def test_newest_commit_wins_over_highest_step_after_a_rollback(tmp_path):
    # Resumed on purpose from step 4 of a run that had reached step 10, then saved step 6: the
    # step-10 folder belongs to the abandoned continuation.
    make_checkpoint(tmp_path, 4, saved_at=1.0)
    make_checkpoint(tmp_path, 10, saved_at=2.0)
    make_checkpoint(tmp_path, 6, saved_at=3.0)
    (tmp_path / LATEST).write_text("step-6\n")
    assert find_latest(tmp_path).step == 6


def test_deletion_invalidates_before_removing_and_debris_is_cleaned(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    remove_checkpoint(folder)
    assert not folder.exists() and not (tmp_path / "step-2.trash").exists()
    # What a crash in the middle of a deletion leaves: marker gone, files still there.
    half_deleted = make_checkpoint(tmp_path, 4)
    (half_deleted / MARKER).unlink()
    (tmp_path / "step-6.trash").mkdir()
    (tmp_path / "step-8.staging").mkdir()
    keep = make_checkpoint(tmp_path, 10)
    assert complete_checkpoints(tmp_path)[0].path == keep
    removed = sorted(p.name for p in remove_debris(tmp_path))
    assert removed == ["step-4", "step-6.trash", "step-8.staging"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10"]


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / LATEST
    atomic_write_text(target, "step-2\n")
    atomic_write_text(target, "step-4\n")
    assert target.read_text() == "step-4\n"
    assert [p.name for p in tmp_path.iterdir()] == [LATEST]


def test_metadata_mismatch_names_each_difference(tmp_path):
    saved = {"zero_stage": 3, "precision": "bf16", "param_count": 10, "model_config": {"d_model": 512}}
    current = {"zero_stage": 2, "precision": "fp32", "param_count": 10, "model_config": {"d_model": 768}}
    problems = compare_metadata(tmp_path, saved, current)
    assert problems == [
        "ZeRO stage: checkpoint has 3, this job has 2",
        "precision: checkpoint has 'bf16', this job has 'fp32'",
        "model config d_model: checkpoint has 512, this job has 768",
    ]
    assert compare_metadata(tmp_path, saved, dict(saved, world_size=8)) == []


def test_conversion_refuses_an_incomplete_checkpoint(tmp_path):
    folder = make_checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(CheckpointError, match="step-2: no COMPLETE marker"):
        convert_to_universal(folder)
    assert not (folder / "universal").exists()


def test_config_rejects_bad_values_and_unknown_keys():
    assert from_dict(CheckpointConfig, {"interval": 50, "keep_last": 2}).interval == 50
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        CheckpointConfig(interval=0)
    with pytest.raises(ConfigError, match="convert_universal"):
        from_dict(CheckpointConfig, {"convert_universal": "sometimes"})
    with pytest.raises(ConfigError, match="unknown config key keep_lats"):
        from_dict(CheckpointConfig, {"keep_lats": 3})



def test_checkpoint_to_load_refuses_what_cannot_be_loaded(tmp_path):
    from hp_deepspeed.checkpointing.layout import checkpoint_to_load

    assert checkpoint_to_load(tmp_path, "auto") is None  # a new run starts fresh
    assert checkpoint_to_load(tmp_path, "none") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint to evaluate"):
        checkpoint_to_load(tmp_path, "auto", required=True)
    with pytest.raises(CheckpointError, match="evaluation needs a checkpoint"):
        checkpoint_to_load(tmp_path, "none", required=True)
    unfinished = make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        checkpoint_to_load(tmp_path, str(unfinished))
    with pytest.raises(CheckpointError, match="is not a step-N checkpoint folder"):
        checkpoint_to_load(tmp_path, str(tmp_path))
    assert checkpoint_to_load(tmp_path, str(make_checkpoint(tmp_path, 2))).step == 2


def test_a_latest_pointer_without_any_checkpoint_left_is_refused(tmp_path):
    """The folder held a run whose checkpoints were deleted: a fresh start there would append to
    its metrics.jsonl and compare new evaluations with its best.json."""
    from hp_deepspeed.checkpointing.layout import checkpoint_to_load

    (tmp_path / LATEST).write_text("step-40\n")
    with pytest.raises(CheckpointError, match=r"latest names 'step-40', which no longer exists, and no complete checkpoint is left"):
        checkpoint_to_load(tmp_path, "auto")
    assert checkpoint_to_load(tmp_path, "none") is None  # an explicit fresh start is the user's call
    make_checkpoint(tmp_path, 2)  # another checkpoint left: resumed from it (with a warning)
    assert checkpoint_to_load(tmp_path, "auto").step == 2
