"""`python -m bench.fidelity`: the statistics on hand-made numbers, the choice of rate and
checkpoint without the test split, the verdicts, the bundled suite, and a tiny study end to end
(trains, caches per cell, resumes, writes the report)."""

import json
import math

import pytest
from scipy import stats

from bench import fidelity
from bench import fidelity_stats as fs
from hp_deepspeed.data import BUNDLED_DATA_DIR
from hp_deepspeed.data.tasks import FIDELITY_TASKS


# ---------------------------------------------------------------------------------------- statistics


def test_interval_is_the_student_t_interval_of_the_mean():
    i = fs.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = stats.t.ppf(0.975, 4) * math.sqrt(2.5) / math.sqrt(5)
    assert (i.mean, i.n) == (3.0, 5) and i.std == pytest.approx(math.sqrt(2.5))
    assert (i.low, i.high) == (pytest.approx(3 - half), pytest.approx(3 + half))


def test_welch_matches_scipy_and_handles_constant_samples():
    a, b = [90.0, 92.0, 91.0, 95.0, 93.0], [88.0, 85.0, 90.0, 86.0, 87.0]
    test = fs.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert test.p == pytest.approx(ref.pvalue) and test.t == pytest.approx(ref.statistic) and test.diff == pytest.approx(5.0)
    assert fs.welch([100.0] * 5, [100.0] * 5).p == 1.0
    assert fs.welch([100.0] * 5, [90.0] * 5).p == 0.0
    with pytest.raises(ValueError, match="at least 2 values"):
        fs.welch([1.0], [2.0, 3.0])


def test_holm_adjusts_step_down_and_stays_monotone():
    assert fs.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert fs.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_detectable_difference_is_what_the_test_finds_with_the_stated_power():
    mde = fs.detectable_difference(2.0, 5, 2.0, 5)
    se = math.sqrt(2 * 4 / 5)
    assert mde == pytest.approx((stats.t.ppf(0.975, 8) + stats.t.ppf(0.8, 8)) * se)
    assert fs.detectable_difference(4.0, 5, 4.0, 5) == pytest.approx(2 * mde)


@pytest.mark.parametrize("diff,p,outcome", [(2.0, 0.01, "agrees"), (2.0, 0.2, "tie"), (-2.0, 0.2, "tie"),
                                            (-2.0, 0.001, "disagrees")])
def test_a_claim_has_three_outcomes(diff, p, outcome):
    assert fs.verdict(diff, p) == outcome


# ---------------------------------------------------------------------------------------- selection


def record(variant, lr, seed, dev, test, steps=(100,)):
    """A cell whose every task scores ``dev``/``test`` (lists: one value per evaluation point)."""
    tasks = ["fidelity/copy", "fidelity/reverse"]
    dev, test = (dev if isinstance(dev, list) else [dev]), (test if isinstance(test, list) else [test])
    points = [{"step": s, "dev": {t: d for t in tasks}, "test": {t: x for t in tasks}}
              for s, d, x in zip(steps, dev, test)]
    return {"variant": variant, "lr": lr, "seed": seed, "points": points, "trainable_params": 10,
            "conditioning_params": 0, "step_time_ms": 1.0}


def test_the_rate_is_chosen_on_the_dev_split_and_only_its_test_scores_are_reported():
    # lr 1e-3 is better on dev, lr 1e-2 would be better on test: the test split must not decide
    records = [record("mtl", 1e-3, s, dev=90.0 + s, test=80.0 + s) for s in range(3)]
    records += [record("mtl", 1e-2, s, dev=85.0 + s, test=99.0) for s in range(3)]
    chosen = fidelity.select(records)["mtl"]
    assert chosen["lr"] == 1e-3 and [fidelity.average(t) for t in chosen["test"]] == [80.0, 81.0, 82.0]
    assert chosen["dev_by_lr"][1e-2].mean == pytest.approx(86.0)


def test_a_rate_missing_seeds_is_not_eligible():
    records = [record("mtl", 1e-3, s, dev=80.0, test=80.0) for s in range(3)] + [record("mtl", 1e-2, 0, dev=99.0, test=99.0)]
    assert fidelity.select(records)["mtl"]["lr"] == 1e-3


def test_the_checkpoint_per_task_is_the_best_dev_point_and_its_test_score_is_reported():
    r = record("mtl", 1e-3, 0, dev=[70.0, 90.0, 80.0], test=[99.0, 60.0, 95.0], steps=(100, 200, 300))
    assert fidelity.best_point_scores(r)["test"] == {"fidelity/copy": 60.0, "fidelity/reverse": 60.0}


def study(values: dict[str, list[float]]) -> dict:
    return fidelity.select([record(v, 3e-3, s, dev=x, test=x) for v, xs in values.items() for s, x in enumerate(xs)])


def test_claims_read_agrees_tie_or_disagrees_and_the_power_control_is_checked():
    selected = study({
        "mtl": [90.0, 91.0, 89.0, 90.5, 90.0],
        "hyperprompt_global": [95.0, 96.0, 94.0, 95.5, 95.0],   # clearly above MTL
        "hyperprompt_share": [95.2, 94.0, 96.0, 95.0, 95.5],    # indistinguishable from Global
        "hyperprompt_sep": [80.0, 81.0, 79.0, 80.5, 80.0],      # clearly below MTL
        "global_shuffled": [60.0, 61.0, 59.0, 60.5, 60.0],
    })
    text = "\n".join(fidelity.claim_lines(fidelity.comparisons(selected)))
    assert "HyperPrompt-Global > MTL baseline (task prefix): **agrees**" in text
    assert "HyperPrompt-Global > HyperPrompt-Share: **tie**" in text
    assert "HyperPrompt-Sep > MTL baseline (task prefix): **disagrees**" in text
    assert "significantly worse, as it must be." in text

    weak = study({"hyperprompt_global": [95.0, 96.0, 94.0, 95.5, 95.0], "global_shuffled": [95.5, 94.0, 95.0, 96.0, 95.0]})
    assert "cannot be trusted" in "\n".join(fidelity.claim_lines(fidelity.comparisons(weak)))


# ---------------------------------------------------------------------------------------- the suite


def rows(task, split):
    return [json.loads(line) for line in (BUNDLED_DATA_DIR / "fidelity" / task / f"{split}.jsonl").open()]


def test_the_bundled_suite_has_shared_inputs_disjoint_splits_and_two_low_resource_tasks():
    sizes = {t: len(rows(t, "train")) for t in FIDELITY_TASKS}
    assert sorted(t for t, n in sizes.items() if n < 1000) == ["place", "reverse"]
    assert len(FIDELITY_TASKS) >= 6
    for family in (("copy", "first", "last", "count", "reverse"), ("object", "place")):
        for split in ("validation", "test"):
            inputs = [[r["inputs"] for r in rows(t, split)] for t in family]
            assert all(i == inputs[0] for i in inputs)
        seen = [{r["inputs"] for r in rows(family[0], split)} for split in ("train", "validation", "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    # a low-resource task's rows are the first rows of its family's training inputs
    assert [r["inputs"] for r in rows("reverse", "train")] == [r["inputs"] for r in rows("copy", "train")][:100]


def test_only_the_mtl_baseline_names_the_task_in_its_inputs(tmp_path):
    cfg = fidelity.StudyConfig()
    assert fidelity.data_config(cfg, "mtl", 0, tmp_path).task_prefix
    assert not any(fidelity.data_config(cfg, v, 0, tmp_path).task_prefix for v in fidelity.STUDY_VARIANTS if v != "mtl")
    assert fidelity.data_config(cfg, "mtl", 0, tmp_path).eval_splits["fidelity/copy"] == ["validation", "test"]


# ---------------------------------------------------------------------------------------- end to end

TINY = ["--variants", "mtl", "global_shuffled", "--seeds", "0", "1", "--lrs", "3e-3", "--steps", "2",
        "--eval-points", "2", "--batch-size", "4", "--max-eval-examples", "4", "--eval-batch-size", "4",
        "--max-new-tokens", "3", "--jobs", "1"]


@pytest.mark.slow
def test_tiny_study_writes_the_report_and_resumes_per_cell(tmp_path, capsys):
    out, doc = tmp_path / "study", tmp_path / "docs" / "fidelity.md"
    args = TINY + ["--out-dir", str(out), "--doc", str(doc)]
    assert fidelity.main(args) == 0
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.name.split("-lr")[0] for c in cells] == ["global_shuffled"] * 2 + ["mtl"] * 2
    cell = json.loads(cells[0].read_text())
    assert [p["step"] for p in cell["points"]] == [1, 2] and cell["conditioning_params"] > 0
    assert set(cell["points"][0]["test"]) == {f"fidelity/{t}" for t in FIDELITY_TASKS}
    text = doc.read_text()
    assert "| MTL baseline (task prefix) | 0.003 |" in text and "| Global, task ids shuffled (power control) | 0.003 |" in text
    assert "Global, task ids shuffled (power control) | MTL baseline (task prefix) |" in text  # the Welch table
    assert (doc.parent / "fidelity.png").stat().st_size > 0

    # a hand-written note survives; cached cells are not retrained, a new variant's are
    doc.write_text(text + "our reading: keep me\n")
    capsys.readouterr()
    assert fidelity.main(["--variants", "mtl", "none"] + args[3:]) == 0
    assert "2 cached" in capsys.readouterr().out and "keep me" in doc.read_text()
    assert "no task information (illustration)" in doc.read_text()


def test_a_changed_setting_is_never_mixed_with_stale_cells(tmp_path):
    a, b = fidelity.StudyConfig(steps=3), fidelity.StudyConfig(steps=4)
    assert a.key() != b.key()
    assert fidelity.cell_path(tmp_path, a, "mtl", 1e-3, 0) != fidelity.cell_path(tmp_path, b, "mtl", 1e-3, 0)
    assert fidelity.cell_path(tmp_path, a, "mtl", 1e-3, 0) != fidelity.cell_path(tmp_path, a, "mtl", 3e-3, 0)


@pytest.mark.parametrize("argv,message", [
    (["--variants", "mtl", "--seeds", "0", "1", "--lrs", "1e-3", "--cell", "2"], "--cell 2: expected 0..1"),
    (["--dev-split", "validation", "--test-split", "validation"], "must be chosen on a split that is not the reported one"),
])
def test_bad_arguments_are_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
