"""The official GLUE and SuperGLUE metrics, on T5's 0-100 scale.

Every metric has the signature ``metric(predictions, references) -> float`` where
``predictions`` are postprocessed model outputs (a class index, a float or a string) and
``references`` are the per-example reference dicts the task preprocessors produce:

* ``{"label": int}`` classification, ``{"label": float}`` regression, ``{"label": str}`` text;
* ReCoRD adds ``"answers": [str, ...]`` (every correct entity string);
* MultiRC adds ``"group": "<paragraph>-<question>"`` (answers of one question);
* AX-g adds ``"pair": int`` (the two examples that differ only in the pronoun's gender).

A prediction that is not a valid label (the model generated something else; postprocessing
gives -1) always counts as wrong, as in T5: for F1 and Matthews correlation it is replaced by
the opposite of the true label rather than forming a class of its own.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# scipy.stats and sklearn.metrics are imported by the metrics that use them: together they add
# about a second to every rank's start-up, and most task mixtures never call them.

Metric = Callable[[Sequence[Any], Sequence[Mapping[str, Any]]], float]


def _labels(references: Sequence[Mapping[str, Any]]) -> list:
    return [ref["label"] for ref in references]


def _binary_valid(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]):
    """Labels and predictions as 0/1 arrays, invalid predictions turned into wrong ones."""
    labels = np.asarray(_labels(references), dtype=np.int64)
    preds = np.asarray(predictions, dtype=np.int64)
    invalid = (preds != 0) & (preds != 1)
    return labels, np.where(invalid, 1 - labels, preds)


def accuracy(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """Percentage of predictions equal to the label (class index or exact target string)."""
    labels = _labels(references)
    return 100.0 * float(np.mean([p == y for p, y in zip(predictions, labels)]))


def f1(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """Binary F1 of the positive class 1 (MRPC, QQP)."""
    import sklearn.metrics

    labels, preds = _binary_valid(predictions, references)
    return 100.0 * float(sklearn.metrics.f1_score(labels, preds, pos_label=1, zero_division=0.0))


def macro_f1(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """Unweighted mean of the per-class F1 over the classes present in labels or predictions
    (CB). Invalid predictions (-1) are wrong for their example and are not a class."""
    import sklearn.metrics

    labels = np.asarray(_labels(references), dtype=np.int64)
    preds = np.asarray(predictions, dtype=np.int64)
    classes = sorted(set(labels.tolist()) | set(preds[preds >= 0].tolist()))
    return 100.0 * float(
        sklearn.metrics.f1_score(labels, preds, labels=classes, average="macro", zero_division=0.0)
    )


def matthews_corrcoef(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """Matthews correlation of binary labels (CoLA, AX-b)."""
    import sklearn.metrics

    labels, preds = _binary_valid(predictions, references)
    return 100.0 * float(sklearn.metrics.matthews_corrcoef(labels, preds))


def _float_pairs(predictions, references):
    return np.asarray(predictions, dtype=np.float64), np.asarray(_labels(references), dtype=np.float64)


def pearson(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """Pearson correlation (STS-B); 0 when either side is constant."""
    import scipy.stats

    preds, labels = _float_pairs(predictions, references)
    if preds.std() == 0 or labels.std() == 0:
        return 0.0
    return 100.0 * float(scipy.stats.pearsonr(preds, labels)[0])


def spearman(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """Spearman rank correlation (STS-B); 0 when either side is constant."""
    import scipy.stats

    preds, labels = _float_pairs(predictions, references)
    if preds.std() == 0 or labels.std() == 0:
        return 0.0
    return 100.0 * float(scipy.stats.spearmanr(preds, labels)[0])


def normalize_answer(text: str) -> str:
    """SQuAD/ReCoRD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    answer_tokens = normalize_answer(answer).split()
    common = collections.Counter(pred_tokens) & collections.Counter(answer_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def record_em(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """ReCoRD exact match: per query the max over its correct answers, averaged over queries."""
    scores = [
        max(float(normalize_answer(str(p)) == normalize_answer(a)) for a in ref["answers"])
        for p, ref in zip(predictions, references)
    ]
    return 100.0 * float(np.mean(scores))


def record_f1(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """ReCoRD token F1: per query the max over its correct answers, averaged over queries."""
    scores = [max(_token_f1(str(p), a) for a in ref["answers"]) for p, ref in zip(predictions, references)]
    return 100.0 * float(np.mean(scores))


def multirc_f1a(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """MultiRC F1a: binary F1 over all answer options of all questions."""
    return f1(predictions, references)


def multirc_em(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """MultiRC exact match: percentage of questions whose answer options are all right."""
    groups: dict[Any, bool] = {}
    for p, ref in zip(predictions, references):
        groups[ref["group"]] = groups.get(ref["group"], True) and p == ref["label"]
    return 100.0 * float(np.mean(list(groups.values())))


def gender_parity(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> float:
    """AX-g gender parity: percentage of pronoun-swapped pairs given the same prediction."""
    pairs: dict[Any, list] = collections.defaultdict(list)
    for p, ref in zip(predictions, references):
        pairs[ref["pair"]].append(p)
    same = [len(set(ps)) == 1 for ps in pairs.values() if len(ps) == 2]
    if not same:
        raise ValueError("gender_parity needs both examples of at least one pair")
    return 100.0 * float(np.mean(same))


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
    "record_em": record_em,
    "record_f1": record_f1,
    "multirc_f1a": multirc_f1a,
    "multirc_em": multirc_em,
    "gender_parity": gender_parity,
}
"""Metric name -> function; the names are what configs and metric logs use."""

# Metrics whose predictions and labels are numbers rather than class indices or strings.
REGRESSION_METRICS = frozenset({"pearson", "spearman"})


def compute_metrics(
    names: Sequence[str], predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """The named metrics plus ``score``, their unweighted mean: the per-task number GLUE and
    SuperGLUE average (e.g. MRPC's score is (F1 + accuracy) / 2)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    out = {name: METRICS[name](predictions, references) for name in names}
    out["score"] = float(np.mean(list(out.values())))
    return out
