"""Save / crash / resume of a real ZeRO-3 engine on 2 gloo ranks, and resume of it on 1 rank.

Three multi-process runs share one run directory, in the order a real job would produce it:
 1. 2 ranks train 10 steps saving at 2, 4, 6, 8 (retention and best pins active), then resume
    step 8 into fresh engines and replay steps 9-10;
 2. 2 ranks resume, train to step 10 and die between the shard writes and the marker;
 3. 1 rank auto-resumes (universal conversion), replays 9-10 and saves step 10;
 4. 2 ranks auto-resume that 1-rank checkpoint (universal conversion the other way, 1 -> 2);
 5. 4 ranks auto-resume a copy of run 1's 2-rank checkpoint (2 -> 4) and replay steps 9-10.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hp_deepspeed.checkpointing.layout import MARKER, complete_checkpoints, find_latest, read_latest
from hp_deepspeed.testing.ranks import DistributedTestError, run_ranks
from tests.checkpointing.bodies import SAVE_UNTIL, TOTAL_STEPS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
BODIES = "tests.checkpointing.bodies"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    results = run_ranks(f"{BODIES}:train_save_resume", 2, timeout=300, args=(str(run_dir),))
    return run_dir, results


@pytest.fixture(scope="module")
def crashed(trained, tmp_path_factory):
    """A copy of the trained run after a save of step 10 died before its marker."""
    run_dir = tmp_path_factory.mktemp("crashed")
    shutil.copytree(trained[0] / "checkpoints", run_dir / "checkpoints")
    with pytest.raises(DistributedTestError, match=r"exited with codes \[17, 17\]"):
        run_ranks(f"{BODIES}:crash_during_save", 2, timeout=300, args=(str(run_dir),))
    # A step-N folder without a marker, with a higher step than anything complete: what a crash
    # during a deletion, or a copy interrupted by hand, leaves. It must never be loaded either.
    root = run_dir / "checkpoints"
    shutil.copytree(root / f"step-{TOTAL_STEPS}.staging", root / "step-12")
    # A complete step-10 committed before step-8: left by an abandoned continuation (the run was
    # once resumed from an older step). Auto-resume must prefer the newer commit, and the next
    # save of step 10 must replace it.
    abandoned = root / f"step-{TOTAL_STEPS}"
    shutil.copytree(root / "step-2", abandoned)
    marker = json.loads((abandoned / MARKER).read_text())
    (abandoned / MARKER).write_text(json.dumps(dict(marker, step=TOTAL_STEPS, time=marker["time"] - 1)))
    (abandoned / "abandoned").write_text("")
    return run_dir


@pytest.fixture(scope="module")
def one_rank(crashed):
    layout_before = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    results = run_ranks(f"{BODIES}:resume_on_one_rank", 1, timeout=300, args=(str(crashed),))
    return crashed, layout_before, results[0]


@pytest.fixture(scope="module")
def two_ranks_again(one_rank):
    run_dir = one_rank[0]
    return run_ranks(f"{BODIES}:resume_on_two_ranks", 2, timeout=300, args=(str(run_dir),))


@pytest.fixture(scope="module")
def four_ranks(trained, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("four-ranks")
    shutil.copytree(trained[0] / "checkpoints", run_dir / "checkpoints")
    return run_dir, run_ranks(f"{BODIES}:resume_on_four_ranks", 4, timeout=300, args=(str(run_dir),))


def assert_same_tensors(expected: dict, actual: dict, atol: float = 0.0) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def test_fresh_run_has_nothing_to_resume(trained):
    _, results = trained
    assert [r["fresh_start"] for r in results] == [None, None]


def test_resume_restores_weights_optimizer_scheduler_and_rng_exactly(trained):
    _, results = trained
    for rank, r in enumerate(results):
        assert_same_tensors(r["saved"], r["resumed"])
        assert r["resumed"]["global_steps"].item() == SAVE_UNTIL
        assert all(r["resumed"][k].abs().sum() > 0 for k in r["resumed"] if k.endswith(".exp_avg_sq"))
        assert r["resumed_rng"]["python"] == r["saved_rng"]["python"], f"rank {rank} python RNG"
        assert r["resumed_rng"]["numpy"] == r["saved_rng"]["numpy"], f"rank {rank} numpy RNG"
        assert torch.equal(r["resumed_rng"]["torch"], r["saved_rng"]["torch"]), f"rank {rank} torch RNG"
        assert r["trainer_state"] == {"step": SAVE_UNTIL, "sampler": {"offset": 4 * SAVE_UNTIL}}
    # Per-rank RNG really differs, so restoring rank r's own file is what made the replay exact.
    assert not torch.equal(results[0]["saved_rng"]["torch"], results[1]["saved_rng"]["torch"])


def test_resumed_run_replays_the_uninterrupted_losses(trained):
    _, results = trained
    uninterrupted = {s: results[0]["losses"][s] for s in range(SAVE_UNTIL + 1, TOTAL_STEPS + 1)}
    for r in results:
        assert r["replayed"] == uninterrupted  # fp32, same ranks, same RNG: bit-identical


def test_checkpoint_folder_contents(trained):
    root = trained[0] / "checkpoints"
    step_dir = root / f"step-{SAVE_UNTIL}"
    marker = json.loads((step_dir / MARKER).read_text())
    assert marker["step"] == SAVE_UNTIL and marker["world_size"] == 2 and marker["zero_stage"] == 3
    assert marker["precision"] == "fp32" and marker["param_count"] == 8 * 16 + 16 + 16 + 1
    assert sorted(p.name for p in (step_dir / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    assert (step_dir / "config.yaml").read_text() == "toy: true\n"
    assert json.loads((step_dir / "params.json").read_text())["inp.weight"] == [16, 8]
    assert read_latest(root) == f"step-{SAVE_UNTIL}"
    assert not list(root.glob("*.staging")) and not list(root.glob("*.trash"))


def test_retention_keeps_last_k_plus_best_per_task(trained):
    root = trained[0] / "checkpoints"
    # keep_last=2 keeps 6 and 8; "a" is best at 2 (pinned), "b" best at 6; step 4 is deleted.
    assert [info.step for info in complete_checkpoints(root)] == [2, 6, 8]
    assert not (root / "step-4").exists()
    best = json.loads((root / "best.json").read_text())
    assert best == {"a": {"step": 2, "score": 0.9}, "b": {"step": 6, "score": 0.7}}


def test_saving_a_step_already_on_disk_from_this_process_is_skipped(trained):
    assert [r["double_save_skipped"] for r in trained[1]] == [True, True]
    assert [r["resave_skipped"] for r in trained[1]] == [True, True]


def test_crash_between_shards_and_marker_keeps_previous_checkpoint(crashed):
    root = crashed / "checkpoints"
    staging = root / f"step-{TOTAL_STEPS}.staging"
    assert staging.is_dir() and any(staging.glob("zero_pp_rank_1_*_optim_states.pt"))
    assert not (staging / MARKER).exists()
    assert read_latest(root) == f"step-{SAVE_UNTIL}"
    # Neither the staging folder, nor step-12 (no marker), nor the older commit of step-10 wins.
    assert find_latest(root).step == SAVE_UNTIL


def test_resume_on_fewer_ranks_goes_through_universal_checkpoint(one_rank, trained):
    run_dir, layout_before, r = one_rank
    two_rank = trained[1]
    assert f"step-{TOTAL_STEPS}.staging" in layout_before
    assert r["trainer_state"] == {"step": SAVE_UNTIL, "sampler": {"offset": 4 * SAVE_UNTIL}}
    assert (run_dir / "checkpoints" / f"step-{SAVE_UNTIL}" / "universal" / MARKER).is_file()
    # Full fp32 weights and both Adam moments are rebuilt from the two shards; lr and step kept.
    assert_same_tensors(two_rank[0]["saved"], r["resumed"], atol=1e-7)
    # Step 9's loss checks the weights, step 10's the Adam update of step 9 (moments and step count).
    for step, loss in two_rank[0]["no_dropout"].items():
        assert r["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
    # And the state after two updates: catches per-group hyperparameters and Adam step counts that
    # DeepSpeed's universal loader gets wrong on its own (see manager._repair_universal_load).
    assert_same_tensors(two_rank[0]["no_dropout_after"], r["after"], atol=1e-6)
    # Rank 0 took rank 0's generator file (documented policy for a changed world size).
    assert torch.equal(r["resumed_rng"]["torch"], two_rank[0]["saved_rng"]["torch"])


def test_save_after_the_crash_cleans_debris_and_records_the_new_world_size(one_rank):
    run_dir, _, r = one_rank
    root = run_dir / "checkpoints"
    assert r["saved_path"] == str(root / f"step-{TOTAL_STEPS}")
    assert json.loads((root / f"step-{TOTAL_STEPS}" / MARKER).read_text())["world_size"] == 1
    assert not (root / f"step-{TOTAL_STEPS}" / "abandoned").exists()  # the abandoned one was replaced
    assert read_latest(root) == f"step-{TOTAL_STEPS}"
    assert not (root / f"step-{TOTAL_STEPS}.staging").exists() and not (root / "step-12").exists()


def test_mismatched_model_is_refused_with_the_difference_named(one_rank):
    _, _, r = one_rank
    config_error, shapes_error = r["wrong_model_error"], r["wrong_shapes_error"]
    assert config_error is not None and shapes_error is not None
    assert f"step-{SAVE_UNTIL}" in config_error and "model config hidden: checkpoint has 16, this job has 32" in config_error
    assert f"step-{SAVE_UNTIL}" in shapes_error
    assert "parameter count: checkpoint has 161, this model has 321" in shapes_error
    assert "parameter inp.weight: checkpoint shape [16, 8], model shape [32, 8]" in shapes_error


def test_explicit_resume_of_an_incomplete_folder_is_refused(one_rank):
    _, _, r = one_rank
    assert "step-12" in r["incomplete_error"] and "no COMPLETE marker" in r["incomplete_error"]


def test_one_rank_checkpoint_resumes_on_two_ranks(one_rank, two_ranks_again):
    run_dir, _, one = one_rank
    step_dir = run_dir / "checkpoints" / f"step-{TOTAL_STEPS}"
    assert (step_dir / "universal" / MARKER).is_file()
    for r in two_ranks_again:
        assert r["saved_on"] == 1
        assert r["trainer_state"] == {"step": TOTAL_STEPS, "sampler": {"offset": 4 * TOTAL_STEPS}}
        # Weights, both Adam moments, per-group weight decay, lr and step count: each rank's
        # gathered view of the re-partitioned state is the 1-rank run's state when it saved.
        assert_same_tensors(one["after"], r["resumed"], atol=1e-7)


def test_two_rank_checkpoint_resumes_on_four_ranks(trained, four_ranks):
    run_dir, results = four_ranks
    two_rank = trained[1][0]
    assert (run_dir / "checkpoints" / f"step-{SAVE_UNTIL}" / "universal" / MARKER).is_file()
    for r in results:
        assert (r["saved_on"], r["step"]) == (2, SAVE_UNTIL)
        assert r["trainer_state"] == {"step": SAVE_UNTIL, "sampler": {"offset": 4 * SAVE_UNTIL}}
        # Every rank's gathered view of the state re-partitioned four ways is the 2-rank state.
        assert_same_tensors(two_rank["saved"], r["resumed"], atol=1e-7)
        # The same global batch, now one sample per rank: the 2-rank continuation's losses and
        # state after two more updates (Adam moments, step counts, per-group weight decay).
        for step, loss in two_rank["no_dropout"].items():
            assert r["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
        assert_same_tensors(two_rank["no_dropout_after"], r["after"], atol=1e-6)
