"""metrics.jsonl and TensorBoard after a resume: one point per step, never going back in time,
and the ``eval`` command's results in a series of their own."""

from __future__ import annotations

import json

import pytest

from hp_deepspeed.training.metrics_log import EVAL_CHECKPOINT, MetricsLog, read_metrics


def scalars(folder, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def launch(run_dir, steps, start_step, eval_every=4, **kwargs):
    metrics = MetricsLog(run_dir, enabled=True, start_step=start_step, **kwargs)
    for step in steps:
        metrics.write("train", step, {"loss": 10.0 - step})
        if step % eval_every == 0:
            metrics.write("eval", step, {"score": float(step)})
    metrics.close()


def test_a_resumed_run_drops_what_was_logged_past_its_checkpoint_from_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    launch(tmp_path, range(1, 8), start_step=0)  # interrupted at step 7, last checkpoint step 4
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "st')  # and killed in the middle of a line
    launch(tmp_path, range(5, 11), start_step=4)  # resumed from step 4, trained to 10

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in lines if r["kind"] == "train"]
    assert train == list(range(1, 11))  # the raw file, not only read_metrics, has each step once
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [4, 8]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == train
    assert scalars(tmp_path / "tensorboard", "train/loss") == list(range(1, 11))
    assert scalars(tmp_path / "tensorboard", "eval/score") == [4, 8]


def test_a_fresh_start_in_a_used_run_dir_keeps_nothing_of_the_old_curve(tmp_path):
    pytest.importorskip("tensorboard")
    launch(tmp_path, range(1, 4), start_step=0)
    launch(tmp_path, range(1, 3), start_step=0)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert scalars(tmp_path / "tensorboard", "train/loss") == [1, 2]


def test_the_eval_command_writes_its_own_series_not_a_second_training_point(tmp_path):
    pytest.importorskip("tensorboard")
    launch(tmp_path, range(1, 9), start_step=0)
    evaluation = MetricsLog(tmp_path, enabled=True, start_step=8, evaluating=True)
    evaluation.write("eval", 8, {"score": 99.0})
    evaluation.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["score"] for r in records if r["kind"] == "eval"] == [4.0, 8.0]
    assert [(r["step"], r["score"]) for r in records if r["kind"] == EVAL_CHECKPOINT] == [(8, 99.0)]
    assert scalars(tmp_path / "tensorboard", "eval/score") == [4, 8]
    assert scalars(tmp_path / "tensorboard" / EVAL_CHECKPOINT, "eval/score") == [8]
