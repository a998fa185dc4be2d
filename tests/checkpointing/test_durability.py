"""What a save leaves on disk with a real DeepSpeed engine on 2 gloo ranks: every file and every
folder fsynced before ``COMPLETE`` at ZeRO stages 0 to 3, and a write that fails on one rank
ending the save on both within seconds, the previous checkpoint untouched.

One pair of processes runs both (``bodies.every_stage_then_a_failed_write``): starting two ranks
costs more than the saves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hp_deepspeed.checkpointing.integrity import verify
from hp_deepspeed.checkpointing.layout import MARKER, read_latest, read_marker
from hp_deepspeed.testing.ranks import run_ranks

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("durability")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HP_DIST_TIMEOUT", "1800")  # the default: the failed save must not need a timeout
        ranks = run_ranks("tests.checkpointing.bodies:every_stage_then_a_failed_write", 2, timeout=300,
                          args=(str(run_dir),))
    return run_dir, ranks


def committed_name(path: str) -> str:
    """A path fsynced during the save, as it is named once committed (no .staging, no temp name)."""
    return re.sub(r"/\.([^/]+)\.[^./]+\.tmp$", r"/\1", path.replace(".staging", ""))


def fsync_record(ranks: list[dict], stage: int) -> tuple[list[str], set[str], set[str]]:
    """What the save at ``stage`` wrote (but its marker), the folders holding it, and every path
    fsynced before the marker, named as committed."""
    written = ranks[0]["stages"][stage]["files"]
    synced = {committed_name(path) for rank in ranks for path in rank["stages"][stage]["synced"]}
    files = [path for path in written if Path(path).name != MARKER]
    return files, {str(Path(path).parent) for path in files}, synced


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_file_and_folder_a_save_writes_is_fsynced_before_complete(results, stage):
    _, ranks = results
    step_dir = ranks[0]["stages"][stage]["step_dir"]
    files, folders, synced = fsync_record(ranks, stage)
    assert [path for path in files if path not in synced] == []
    assert folders == {step_dir, f"{step_dir}/rng"} and folders <= synced
    if stage < 3:  # the weights file every stage below 3 writes once, from rank 0
        assert f"{step_dir}/mp_rank_00_model_states.pt" in files
    else:
        assert sum("_model_states.pt" in path for path in files) == 2
    assert read_marker(step_dir)["zero_stage"] == stage


def test_a_write_failing_on_one_rank_ends_the_save_on_every_rank_within_seconds(results):
    run_dir, ranks = results
    root = run_dir / "failed" / "checkpoints"
    errors = [rank["failed"]["error"] for rank in ranks]
    assert errors[0] == errors[1]  # every rank learns the same thing at the agreement point
    lines = errors[0].splitlines()
    assert lines[0] == "checkpoint step-4 not saved (step-2 stays the checkpoint to resume from):"
    assert len(lines) == 2 and re.fullmatch(
        rf"  - rank 1 could not write {root}/step-4.staging/zero_pp_rank_1_mp_rank_00_\w+_states.pt"
        r"( \(and \d+ more files\))?: file too large", lines[1]), lines[1]
    assert max(rank["failed"]["seconds"] for rank in ranks) < 30
    assert read_latest(root) == "step-2"
    assert not (root / "step-4").exists() and not (root / "step-4.staging").exists()
    marker = read_marker(root / "step-2")
    assert [verify(root / "step-2", marker, rank, 2) for rank in (0, 1)] == [None, None]
    # Each rank's shards are recorded as its own, so at resume each rank reads back what it wrote.
    files = json.loads((root / "step-2" / "manifest.json").read_text())["files"]
    assert {rel: entry["rank"] for rel, entry in files.items() if rel.startswith("zero_pp_rank_")} == {
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt": r for r in (0, 1) for kind in ("model", "optim")}
