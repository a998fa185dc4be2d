"""Metrics against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from hp_deepspeed.data.metrics import (
    accuracy,
    compute_metrics,
    f1,
    gender_parity,
    macro_f1,
    matthews_corrcoef,
    multirc_em,
    multirc_f1a,
    pearson,
    record_em,
    record_f1,
    spearman,
)
from hp_deepspeed.data.tasks import benchmark_average


def refs(labels, **extra):
    return [{"label": y, **{k: v[i] for k, v in extra.items()}} for i, y in enumerate(labels)]


def test_accuracy():
    assert accuracy([0, 1, 1, 0], refs([0, 1, 0, 0])) == 75.0
    assert accuracy(["a b", "c"], refs(["a b", "d"])) == 50.0


def test_f1_invalid_prediction_counts_as_wrong():
    # -1 (not a label word) becomes 1 - label = 0: preds 1,1,0,1,0 vs labels 1,0,0,1,1
    # TP=2 FP=1 FN=1 -> P=R=2/3 -> F1=2/3
    assert f1([1, 1, 0, 1, -1], refs([1, 0, 0, 1, 1])) == pytest.approx(200 / 3)


def test_matthews():
    # TP=1 FP=1 TN=2 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2) = 2 / sqrt(12)
    assert matthews_corrcoef([1, 1, 0, 0], refs([1, 0, 0, 0])) == pytest.approx(100 * 2 / math.sqrt(12))


def test_macro_f1():
    # class 0: P=1 R=1/2 F1=2/3; class 1: P=1/2 R=1 F1=2/3; class 2: F1=0 -> mean 4/9
    assert macro_f1([0, 1, 1, -1], refs([0, 0, 1, 2])) == pytest.approx(400 / 9)


def test_pearson_spearman():
    # x-mean = -1,0,1; y-mean = -4/3,-1/3,5/3: cov 3, var 2 and 14/3 -> 3 / sqrt(28/3)
    assert pearson([1, 2, 3], refs([1, 2, 4])) == pytest.approx(100 * 3 / math.sqrt(28 / 3))
    # ranks 1,3,2 vs 1,2,3: sum d^2 = 2 -> 1 - 6*2 / (3*8) = 0.5
    assert spearman([1, 3, 2], refs([1, 2, 3])) == pytest.approx(50.0)
    assert pearson([1, 1, 1], refs([1, 2, 3])) == 0.0


def test_record_max_over_answers():
    references = refs(["Eiffel Tower", "Eiffel Tower"], answers=[["Eiffel Tower", "Tower"], ["Eiffel Tower", "Tower"]])
    predictions = ["The Eiffel tower!", "big Tower"]
    # 1: normalised equal. 2: vs "eiffel tower" F1 1/2, vs "tower" P=1/2 R=1 F1=2/3; EM 0
    assert record_em(predictions, references) == pytest.approx(50.0)
    assert record_f1(predictions, references) == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_multirc():
    references = refs([1, 0, 1, 0, 1], group=["q1", "q1", "q1", "q2", "q2"])
    predictions = [1, 0, 0, 0, 1]
    # all answers right only for q2 -> EM 50; TP=2 FP=0 FN=1 -> F1 = 0.8
    assert multirc_em(predictions, references) == 50.0
    assert multirc_f1a(predictions, references) == pytest.approx(80.0)


def test_gender_parity():
    assert gender_parity([0, 0, 0, 1], refs([0, 0, 1, 1], pair=[0, 0, 1, 1])) == 50.0


def test_compute_metrics_score_is_mean():
    out = compute_metrics(["f1", "accuracy"], [1, 1, 0, 0], refs([1, 0, 0, 0]))
    # F1: TP=1 FP=1 -> 2/3; accuracy 3/4
    assert out["score"] == pytest.approx((200 / 3 + 75) / 2)
    with pytest.raises(ValueError):
        compute_metrics(["accuracy"], [1], refs([1, 0]))


def test_benchmark_average():
    glue = {
        "glue/cola": 10.0, "glue/sst2": 20.0, "glue/mrpc": {"f1": 30.0, "accuracy": 50.0, "score": 40.0},
        "glue/qqp": 30.0, "glue/stsb": 50.0, "glue/mnli_matched": 60.0, "glue/mnli_mismatched": 80.0,
        "glue/qnli": 80.0, "glue/rte": 90.0, "glue/wnli": 0.0,
    }
    # MNLI counts once as (60+80)/2 = 70; nine tasks: (10+20+40+30+50+70+80+90+0)/9 = 390/9
    assert benchmark_average(glue) == {"glue_average": pytest.approx(390 / 9)}
    partial = {"glue/cola": 10.0, "superglue/boolq": 70.0, "superglue/axb": 5.0}
    assert benchmark_average(partial) == {}
    assert benchmark_average(partial, require_complete=False) == {"glue_average": 10.0, "superglue_average": 70.0}
    superglue = {n: 50.0 for n in ("boolq", "cb", "copa", "multirc", "record", "rte", "wic")}
    superglue = {f"superglue/{k}": v for k, v in superglue.items()} | {"superglue/wsc": 90.0, "superglue/axg": 0.0}
    # eight tasks, diagnostics excluded: (7*50 + 90) / 8
    assert benchmark_average(superglue) == {"superglue_average": pytest.approx(440 / 8)}
