"""``hp-deepspeed report``: plots from a synthetic metrics.jsonl, a resumed run's re-logged
steps, and the error on a run directory without metrics."""

import argparse
import json
import math

import pytest

from hp_deepspeed.tools import report
from hp_deepspeed.training.metrics_log import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir):
    """A run that trained to step 60, was preempted after its step-40 checkpoint had been
    overtaken (steps 50 and 60 logged), resumed from step 40 and re-logged 50 and 60."""
    lines = []
    for step in range(10, 70, 10):
        lines.append({"kind": "train", "step": step, "time": float(step), "loss": 3.0 / step, "lr": 1e-4,
                      "loss/glue/rte": 3.5 / step, "loss/superglue/cb": 2.5 / step, "tokens_per_s": 1e4})
        if step % 20 == 0:
            lines.append({"kind": "eval", "step": step, "time": float(step),
                          "glue/rte/accuracy": 0.5 + step / 200, "glue/mrpc/accuracy": 0.6 + step / 300,
                          "glue/mrpc/f1": 0.7 + step / 400, "glue_average": 0.6 + step / 250,
                          "superglue/cb/accuracy": 0.4 + step / 150, "superglue/cb/f1": 0.3 + step / 150,
                          "superglue_average": 0.35 + step / 150})
    for step in (50, 60):  # the resumed run: different values for the same steps
        lines.append({"kind": "train", "step": step, "time": 100.0 + step, "loss": 9.0,
                      "loss/glue/rte": 9.5, "loss/superglue/cb": 8.5})
    lines.append({"kind": "eval", "step": 60, "time": 170.0, "glue/rte/accuracy": 0.99, "glue_average": 0.98})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_series_keep_the_resumed_values(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    overall, per_task = report.loss_series(records)
    assert overall["loss"][0] == [10, 20, 30, 40, 50, 60]
    assert overall["loss"][1][-2:] == [9.0, 9.0]
    assert set(per_task) == {"glue/rte", "superglue/cb"}
    evals = report.eval_series(records)
    assert set(evals) == {"glue", "superglue"}
    assert set(evals["glue"]) == {"glue/rte", "glue/mrpc", "glue_average"}
    assert set(evals["glue"]["glue/mrpc"]) == {"accuracy", "f1"}
    assert evals["glue"]["glue/rte"]["accuracy"] == ([20, 40, 60], [0.6, 0.7, 0.99])
    # The resumed step-60 eval logged only RTE: MRPC's last point is the one from step 40.
    assert evals["glue"]["glue/mrpc"]["f1"][0] == [20, 40]
    assert evals["superglue"]["superglue_average"]["average"][0] == [20, 40]


def test_eval_sets_without_a_benchmark_prefix():
    """Custom tasks, and the ``glue_rte`` spelling when a ``glue_average`` says it is GLUE."""
    records = [{"kind": "eval", "step": 5, "time": 0.0, "glue_rte/accuracy": 0.5, "glue_average": 0.5,
                "my_task/exact_match": 0.25, "synthetic/add/accuracy": 1.0}]
    evals = report.eval_series(records)
    assert set(evals) == {"glue", "tasks", "synthetic"}
    assert set(evals["glue"]) == {"glue_rte", "glue_average"}
    assert evals["tasks"] == {"my_task": {"exact_match": ([5], [0.25])}}
    assert evals["synthetic"] == {"synthetic/add": {"accuracy": ([5], [1.0])}}


def test_report_writes_pngs(tmp_path, capsys):
    _write_run(tmp_path)
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(tmp_path)])) == 0
    printed = capsys.readouterr().out.split()
    names = {"loss.png", "eval_glue.png", "eval_superglue.png"}
    assert {p.rsplit("/", 1)[-1] for p in printed} == names
    for name in names:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_train_only_run_and_nan_loss(tmp_path):
    rows = [{"kind": "train", "step": s, "time": 0.0, "loss": math.nan if s == 2 else 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [p.name for p in report.write_report(tmp_path)] == ["loss.png"]
    overall, per_task = report.loss_series(read_metrics(tmp_path / "metrics.jsonl"))
    assert overall["loss"][0] == [1, 3] and per_task == {}


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(report.ReportError, match="no metrics.jsonl"):
        report.write_report(tmp_path)
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(tmp_path / "nope")])) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "time": 0.0, "lr": 1e-4}) + "\n")
    with pytest.raises(report.ReportError, match="no training loss"):
        report.write_report(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "st')
    # A last line cut short by a crash is skipped ...
    with pytest.raises(report.ReportError, match="no training loss"):
        report.write_report(tmp_path)
    # ... a malformed line before the end is an error.
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write("\n" + json.dumps({"kind": "train", "step": 2, "time": 0.0, "loss": 1.0}) + "\n")
    with pytest.raises(report.ReportError, match="not a valid metrics file"):
        report.write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def _eval_run(run_dir, variant, scores, data_dir=None):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"conditioning:\n  variant: {variant}\ndata:\n  data_dir: {data_dir or 'null'}\n")
    records = [{"kind": "eval", "step": 50, "time": 1.0, **{f"{k}/score": 0.0 for k in scores}},
               {"kind": "eval", "step": 100, "time": 2.0, **{f"{k}/score": v for k, v in scores.items()}}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_closing_table_sets_the_runs_side_by_side_and_bundled_glue_apart(tmp_path, capsys):
    _eval_run(tmp_path / "run", "hyperprompt_global", {"synthetic/first": 100.0, "synthetic/copy": 96.0, "glue/rte": 50.0})
    _eval_run(tmp_path / "base", "none", {"synthetic/first": 40.0, "synthetic/copy": 30.0, "glue/rte": 41.7})
    table = report.closing_table(tmp_path / "run", tmp_path / "base")
    lines = table.splitlines()
    assert "hyperprompt_global (step 100)" in lines[0] and "none (step 100)" in lines[0]
    assert lines[2].split() == ["synthetic/copy", "96.0", "30.0"]
    assert lines[4].split() == ["average", "98.0", "35.0"]  # the scored sets only
    assert "format checks" in lines[5] and lines[6].split() == ["glue/rte", "50.0", "41.7"]
    # on real data files GLUE is scored like any task
    _eval_run(tmp_path / "real", "hyperprompt_global", {"glue/rte": 70.0}, data_dir="/data/glue")
    assert "format checks" not in report.closing_table(tmp_path / "real", tmp_path / "base")
    # the command prints it after the plots
    args = argparse.Namespace(run_dir=tmp_path / "run", baseline=tmp_path / "base")
    assert report.run(args) == 0 and "format checks" in capsys.readouterr().out
