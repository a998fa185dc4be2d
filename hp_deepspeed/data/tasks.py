"""Task registry: T5-style text-to-text preprocessing, postprocessing and metrics per task.

Every GLUE and SuperGLUE task is registered under ``glue/<task>`` or ``superglue/<task>``;
the two benchmarks both contain "rte", which is why names carry the benchmark. The formats
follow T5's ``preprocessors.glue`` (``t5/data/glue_utils.py``): the input is the task name and
``"<field>: <text>"`` for each text field in sorted order (explicit orders for MultiRC and
WiC), the target is the label word; STS-B, WSC and ReCoRD have their own preprocessors:

    glue/rte        "rte sentence1: ... sentence2: ..."          -> "entailment" | "not_entailment"
    glue/mnli       "mnli hypothesis: ... premise: ..."          -> "entailment" | "neutral" | "contradiction"
    glue/stsb       "stsb sentence1: ... sentence2: ..."         -> "3.8" (label rounded to 0.2)
    superglue/copa  "copa choice1: ... choice2: ... premise: ... question: ..." -> "choice1" | "choice2"
    superglue/multirc "multirc question: ... answer: ... paragraph: ..." -> "False" | "True"
    superglue/wsc   "wsc text: The * trophy * did not fit because # it # was big." -> "False" | "True"
    superglue/record "record query: ... @placeholder ... entities: A, B passage: ..." -> an answer
    superglue/axb, superglue/axg   cast as RTE, as T5 did: "rte sentence1: ..." / "rte hypothesis: ..."

Rows are in the schema of the hub datasets ``nyu-mll/glue`` and ``aps/super_glue`` (integer
labels in the hub's label order), so local files and hub downloads go through the same code.
ReCoRD training rows become one example per correct answer (T5's ``record``); ReCoRD
evaluation keeps one example per query whose reference holds every answer.

The ``fidelity/*`` tasks (the fidelity study's suite, ``FIDELITY_TASKS``) and the
``synthetic/*`` tasks are made by scripts/make_bundled_data.py: the same word sequences
with no task text in the input, and a different required output per task (copy, reverse,
sort, first, last), so only a model told the task can solve more than one of them.

With ``data.task_prefix`` (the paper's multi-task baseline, ``conditioning.variant: mtl``)
the synthetic and custom tasks name the task in their input, as GLUE/SuperGLUE do:
``"copy: ant tower fox"``; see ``task_prefix``.

Custom tasks (``CustomTaskConfig``) get an input template, a target field or label words, and
metric names. ``build_tasks`` turns a ``DataConfig`` into ``Task`` objects with stable ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from hp_deepspeed.config import ConfigError, to_dict
from hp_deepspeed.errors import DataError
from hp_deepspeed.data.config import CustomTaskConfig, DataConfig
from hp_deepspeed.data.metrics import METRICS, REGRESSION_METRICS, compute_metrics

# Bump when any preprocessor's output changes: it is part of every tokenisation cache key.
PREPROCESSING_VERSION = 1


class MalformedRow(Exception):
    """Raised by a preprocessor for one bad row; the loader adds the file and line and either
    raises ``DataError`` or, for ``skippable`` problems under ``on_bad_row: skip``, drops it."""

    def __init__(self, message: str, skippable: bool = True):
        super().__init__(message)
        self.skippable = skippable


@dataclass(frozen=True)
class Example:
    """One text-to-text example and the raw reference its metric needs."""

    inputs: str
    targets: str
    reference: dict[str, Any]


# A preprocessor maps one raw row (and whether it is training data) to examples.
Preprocessor = Callable[[Mapping[str, Any], bool], list[Example]]


# --------------------------------------------------------------------------- row access


def _text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise MalformedRow(f"missing field {name!r}")
    if not isinstance(value, str):
        raise MalformedRow(f"field {name!r} should be a string, got {value!r}")
    return value


def _int(row: Mapping[str, Any], name: str) -> int:
    value = row.get(name)
    if value is None:
        raise MalformedRow(f"missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRow(f"field {name!r} should be an integer, got {value!r}")
    return value


def _class_label(row: Mapping[str, Any], name: str, label_words: Sequence[str]) -> int:
    """The label index; a word from ``label_words`` is accepted too (CSV files often hold it).
    A label outside the label set is not skippable: it means the data and task disagree."""
    value = row.get(name)
    if isinstance(value, str) and value in label_words:
        return list(label_words).index(value)
    if value is None:
        raise MalformedRow(f"missing field {name!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # one fractional label elsewhere makes ``datasets`` read all as floats
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(label_words):
        raise MalformedRow(
            f"label {value!r} is outside the label set: indices 0..{len(label_words) - 1} "
            f"or words {list(label_words)}",
            skippable=False,
        )
    return value


def _float(row: Mapping[str, Any], name: str) -> float:
    value = row.get(name)
    if value is None:
        raise MalformedRow(f"missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRow(f"field {name!r} should be a number, got {value!r}")
    return float(value)


def _idx(row: Mapping[str, Any], *keys: str) -> dict[str, int]:
    idx = row.get("idx")
    if not isinstance(idx, Mapping):
        raise MalformedRow(f"field 'idx' should be a mapping with keys {list(keys)}, got {idx!r}")
    return {k: _int(idx, k) for k in keys}


# --------------------------------------------------------------------------- preprocessors


def glue_preprocessor(benchmark_name: str, label_words: Sequence[str], feature_names: Sequence[str]) -> Preprocessor:
    """T5's ``preprocessors.glue``: "<name> <f1>: <text> <f2>: <text>" -> label word."""

    def preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
        parts = [benchmark_name]
        for name in feature_names:
            parts += [f"{name}:", _text(row, name)]
        label = _class_label(row, "label", label_words)
        return [Example(" ".join(parts), label_words[label], {"label": label})]

    return preprocess


def stsb_preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
    """T5's ``preprocessors.stsb``: the 0-5 similarity rounded to the nearest 0.2, one decimal."""
    label = _float(row, "label")
    if not 0.0 <= label <= 5.0:
        raise MalformedRow(f"STS-B label {label} is outside [0, 5]", skippable=False)
    inputs = f"stsb sentence1: {_text(row, 'sentence1')} sentence2: {_text(row, 'sentence2')}"
    return [Example(inputs, f"{round(label * 5) / 5:.1f}", {"label": label})]


def multirc_preprocessor(label_words: Sequence[str]) -> Preprocessor:
    """T5's MultiRC: ``glue`` with fields question, answer, paragraph and HTML markup removed;
    the reference groups the answer options of one question for exact match."""

    def preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
        paragraph = _text(row, "paragraph").replace("<br>", " ")
        paragraph = re.sub(r"<(/)?b>", "", paragraph)
        inputs = f"multirc question: {_text(row, 'question')} answer: {_text(row, 'answer')} paragraph: {paragraph}"
        label = _class_label(row, "label", label_words)
        idx = _idx(row, "paragraph", "question", "answer")
        group = f"{idx['paragraph']}-{idx['question']}"
        return [Example(inputs, label_words[label], {"label": label, "group": group})]

    return preprocess


def _mark_span(text: str, span: str, index: int, mark: str) -> str:
    """T5's ``_mark_span``: surround ``span`` at word ``index`` with ``mark``."""
    pattern = r"^((?:\S+\s){%d})(%s)" % (index, re.escape(span))
    marked, count = re.subn(pattern, lambda m: f"{m.group(1)}{mark} {m.group(2)} {mark}", text)
    if count != 1:
        raise MalformedRow(f"span {span!r} is not at word {index} of {text!r}")
    return marked


def wsc_preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
    """T5's ``preprocessors.wsc``: the candidate noun marked with *, the pronoun with #."""
    span1_index, span2_index = _int(row, "span1_index"), _int(row, "span2_index")
    text = _mark_span(_text(row, "text"), _text(row, "span1_text"), span1_index, "*")
    # The first mark added two words before the pronoun when the noun comes first.
    span2_index += 2 if span1_index < span2_index else 0
    text = _mark_span(text, _text(row, "span2_text"), span2_index, "#")
    label = _class_label(row, "label", ["False", "True"])
    return [Example(f"wsc text: {text}", ["False", "True"][label], {"label": label})]


def record_preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
    """T5's ``preprocessors.record``: highlights joined into sentences, the entity list in the
    input; training gives one example per answer, evaluation one per query with all answers."""
    passage = re.sub(r"(\.|\?|\!|\"|')\n@highlight\n", r"\1 ", _text(row, "passage"))
    passage = re.sub(r"\n@highlight\n", ". ", passage)
    entities = row.get("entities")
    answers = row.get("answers")
    for name, value in (("entities", entities), ("answers", answers)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MalformedRow(f"field {name!r} should be a list of strings, got {value!r}")
    if not answers:
        raise MalformedRow("ReCoRD row without answers", skippable=False)
    idx = _idx(row, "passage", "query")
    inputs = f"record query: {_text(row, 'query')} entities: {', '.join(entities)} passage: {passage}"
    reference = {"label": answers[0], "answers": list(answers), "group": f"{idx['passage']}-{idx['query']}"}
    targets = answers if training else answers[:1]
    return [Example(inputs, answer, reference) for answer in targets]


def axg_preprocessor(label_words: Sequence[str]) -> Preprocessor:
    """AX-g cast as RTE; consecutive ``idx`` 2k, 2k+1 are the two genders of one sentence."""
    base = glue_preprocessor("rte", label_words, ("hypothesis", "premise"))

    def preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
        (example,) = base(row, training)
        return [Example(example.inputs, example.targets, {**example.reference, "pair": _int(row, "idx") // 2})]

    return preprocess


def text_to_text_preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
    """The synthetic tasks' rows already hold ``inputs`` and ``targets``."""
    targets = _text(row, "targets")
    return [Example(_text(row, "inputs"), targets, {"label": targets})]


# --------------------------------------------------------------------------- postprocessors


def label_postprocessor(label_words: Sequence[str]) -> Callable[[str], int]:
    """Generated text -> label index, -1 when it is not a label word (counted as wrong)."""
    index = {word: i for i, word in enumerate(label_words)}
    return lambda text: index.get(text.strip(), -1)


def float_postprocess(text: str) -> float:
    """Generated text -> float, -1 when it does not parse (T5's ``string_to_float``)."""
    try:
        return float(text.strip())
    except ValueError:
        return -1.0


def text_postprocess(text: str) -> str:
    return text.strip()


# --------------------------------------------------------------------------- registry

# The suite of ``python -m bench.fidelity`` (scripts/make_bundled_data.py): ``reverse`` and
# ``place`` are its low-resource tasks; each task also has a ``test`` split, the one reported.
FIDELITY_TASKS = ("copy", "first", "last", "count", "reverse", "object", "place")


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry or a custom task: everything about a task except where its data is and its id."""

    name: str
    benchmark: str | None
    preprocess: Preprocessor = field(repr=False, compare=False)
    """Raw row and whether it is training data -> examples; raises ``MalformedRow`` for a bad row."""
    postprocess: Callable[[str], Any] = field(repr=False, compare=False)
    """Generated text -> prediction (label index, float or string)."""
    metric_names: tuple[str, ...]
    label_words: tuple[str, ...] | None
    """Label index -> target word for classification (rank scoring); None for generation."""
    train_split: str | None
    eval_splits: tuple[str, ...]
    hub: tuple[str, str | None] | None
    """(dataset, config) of the hub dataset holding the task's splits, if any."""
    in_benchmark_average: bool
    # Evaluation-only tasks are scored with the id of the task they are cast as (AX-b -> RTE).
    evaluate_as: str | None = None


def _classification(
    name: str,
    label_words: Sequence[str],
    metric_names: Sequence[str],
    feature_names: Sequence[str],
    *,
    prefix: str | None = None,
    train_split: str | None = "train",
    eval_splits: Sequence[str] = ("validation",),
    in_average: bool = True,
    evaluate_as: str | None = None,
    preprocess: Preprocessor | None = None,
) -> TaskSpec:
    benchmark, short = name.split("/")
    hub_path = "nyu-mll/glue" if benchmark == "glue" else "aps/super_glue"
    hub_name = {"wsc": "wsc.fixed"}.get(short, short)
    return TaskSpec(
        name=name,
        benchmark=benchmark,
        preprocess=preprocess or glue_preprocessor(prefix or short, label_words, feature_names),
        postprocess=label_postprocessor(label_words),
        metric_names=tuple(metric_names),
        label_words=tuple(label_words),
        train_split=train_split,
        eval_splits=tuple(eval_splits),
        hub=(hub_path, hub_name),
        in_benchmark_average=in_average,
        evaluate_as=evaluate_as,
    )


_NLI2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")


def _bundled_text_task(name: str) -> TaskSpec:
    """A text-to-text task of the bundled data (synthetic/*, fidelity/*), scored by exact match."""
    return TaskSpec(
        name=name,
        benchmark=None,
        preprocess=text_to_text_preprocess,
        postprocess=text_postprocess,
        metric_names=("accuracy",),
        label_words=None,
        train_split="train",
        eval_splits=("validation",),
        hub=None,
        in_benchmark_average=False,
    )


_SPECS: list[TaskSpec] = [
    # GLUE; label orders are those of the hub's ClassLabel features.
    _classification("glue/cola", ("unacceptable", "acceptable"), ["matthews_corrcoef"], ["sentence"]),
    _classification("glue/sst2", ("negative", "positive"), ["accuracy"], ["sentence"]),
    _classification("glue/mrpc", ("not_equivalent", "equivalent"), ["f1", "accuracy"], ["sentence1", "sentence2"]),
    _classification("glue/qqp", ("not_duplicate", "duplicate"), ["f1", "accuracy"], ["question1", "question2"]),
    TaskSpec(
        name="glue/stsb",
        benchmark="glue",
        preprocess=stsb_preprocess,
        postprocess=float_postprocess,
        metric_names=("pearson", "spearman"),
        label_words=None,
        train_split="train",
        eval_splits=("validation",),
        hub=("nyu-mll/glue", "stsb"),
        in_benchmark_average=True,
    ),
    _classification(
        "glue/mnli",
        ("entailment", "neutral", "contradiction"),
        ["accuracy"],
        ["hypothesis", "premise"],
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    _classification("glue/qnli", _NLI2, ["accuracy"], ["question", "sentence"]),
    _classification("glue/rte", _NLI2, ["accuracy"], ["sentence1", "sentence2"]),
    _classification("glue/wnli", ("not_entailment", "entailment"), ["accuracy"], ["sentence1", "sentence2"]),
    # SuperGLUE.
    _classification("superglue/boolq", _BOOL, ["accuracy"], ["passage", "question"]),
    _classification(
        "superglue/cb", ("entailment", "contradiction", "neutral"), ["macro_f1", "accuracy"], ["hypothesis", "premise"]
    ),
    _classification("superglue/copa", ("choice1", "choice2"), ["accuracy"], ["choice1", "choice2", "premise", "question"]),
    _classification(
        "superglue/multirc", _BOOL, ["multirc_f1a", "multirc_em"], (), preprocess=multirc_preprocessor(_BOOL)
    ),
    TaskSpec(
        name="superglue/record",
        benchmark="superglue",
        preprocess=record_preprocess,
        postprocess=text_postprocess,
        metric_names=("record_f1", "record_em"),
        label_words=None,
        train_split="train",
        eval_splits=("validation",),
        hub=("aps/super_glue", "record"),
        in_benchmark_average=True,
    ),
    _classification("superglue/rte", _NLI2, ["accuracy"], ["sentence1", "sentence2"]),
    _classification("superglue/wic", _BOOL, ["accuracy"], ["sentence1", "sentence2", "word"]),
    _classification("superglue/wsc", _BOOL, ["accuracy"], (), preprocess=wsc_preprocess),
    # The diagnostics only have a labelled "test" split and are not part of the average.
    _classification(
        "superglue/axb",
        _NLI2,
        ["matthews_corrcoef"],
        ["sentence1", "sentence2"],
        prefix="rte",
        train_split=None,
        eval_splits=("test",),
        in_average=False,
        evaluate_as="superglue/rte",
    ),
    _classification(
        "superglue/axg",
        _NLI2,
        ["accuracy", "gender_parity"],
        (),
        train_split=None,
        eval_splits=("test",),
        in_average=False,
        evaluate_as="superglue/rte",
        preprocess=axg_preprocessor(_NLI2),
    ),
] + [
    _bundled_text_task(f"synthetic/{op}") for op in ("copy", "reverse", "sort", "first", "last")
] + [
    _bundled_text_task(f"fidelity/{op}") for op in FIDELITY_TASKS
]

REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
"""Registry name -> TaskSpec for every built-in task."""

BENCHMARKS = ("glue", "superglue")


# --------------------------------------------------------------------------- tasks


def eval_set_name(task_name: str, eval_splits: Sequence[str], split: str) -> str:
    """The task name, or for tasks with several eval splits the name with the split's suffix
    (``glue/mnli_matched``, ``glue/mnli_mismatched``)."""
    if len(eval_splits) == 1:
        return task_name
    return f"{task_name}_{split.removeprefix('validation_')}"


@dataclass(frozen=True)
class TaskSource:
    """Where a task's split files are: explicit files, a folder, and/or a hub dataset."""

    folder: str | None
    data_files: tuple[tuple[str, str], ...]
    """(split, file) pairs (a tuple so that Task stays hashable)."""
    hub: tuple[str, str | None] | None


@dataclass(frozen=True, kw_only=True)
class Task(TaskSpec):
    """A task of this run: its registry/custom ``TaskSpec`` plus its id and its data source."""

    task_id: int
    """Index of the task in the config (registry tasks first, then custom ones), used by the
    model's task conditioning. Evaluation-only tasks cast as another task that is also
    configured (AX-b, AX-g -> superglue/rte) share that task's id."""
    source: TaskSource
    fingerprint: str
    """Identifies the preprocessing (part of the tokenisation cache key)."""

    primary_metric = "score"
    """Checkpoint selection uses ``metrics()['score']``: the mean of the task's official
    metrics, i.e. the number the benchmark averages."""

    @classmethod
    def of(cls, spec: TaskSpec, **run: Any) -> "Task":
        """``spec`` with this run's fields (``task_id``, ``source``, ``fingerprint``) and the spec
        fields the run overrides (``eval_splits``)."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)} | run)

    def metrics(self, predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Official metrics (0-100) and ``score``, from postprocessed predictions."""
        return compute_metrics(self.metric_names, predictions, references)

    def eval_set_name(self, split: str) -> str:
        """Name under which the metrics of one eval split are reported (see ``eval_set_name``)."""
        return eval_set_name(self.name, self.eval_splits, split)


_CLASSIFICATION_METRICS = frozenset({"accuracy", "f1", "macro_f1", "matthews_corrcoef"})
_TEXT_METRICS = frozenset({"accuracy"}) | REGRESSION_METRICS


def _custom_spec(cfg: CustomTaskConfig) -> TaskSpec:
    """The ``TaskSpec`` of a custom task; ``ConfigError`` when its settings do not fit together."""
    preprocess, postprocess, label_words = _custom_task(cfg)
    return TaskSpec(
        name=cfg.name,
        benchmark=None,
        preprocess=preprocess,
        postprocess=postprocess,
        metric_names=tuple(cfg.metrics),
        label_words=label_words,
        train_split=cfg.train_split,
        eval_splits=tuple(cfg.eval_splits),
        hub=(cfg.path, cfg.hub_config) if cfg.path else None,
        in_benchmark_average=False,
    )


def _custom_task(cfg: CustomTaskConfig) -> tuple[Preprocessor, Callable[[str], Any], tuple[str, ...] | None]:
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"custom task {cfg.name}: unknown metric {unknown[0]!r}; known: {sorted(METRICS)}")
    if (cfg.target_field is None) == (cfg.label_words is None):
        raise ConfigError(f"custom task {cfg.name}: set exactly one of target_field and label_words")
    # The other metrics need references (answer lists, groups, pairs) only registry tasks make.
    usable = _CLASSIFICATION_METRICS if cfg.label_words is not None else _TEXT_METRICS
    unusable = [m for m in cfg.metrics if m not in usable]
    if unusable or not cfg.metrics:
        kind = "label_words" if cfg.label_words is not None else "target_field"
        raise ConfigError(f"custom task {cfg.name}: a task with {kind} takes metrics from {sorted(usable)}, got {cfg.metrics}")
    if cfg.path is None and not cfg.data_files:
        raise ConfigError(f"custom task {cfg.name}: set path (folder or hub id) or data_files")
    fields = [f for _, f, _, _ in string.Formatter().parse(cfg.input_template) if f]
    if not fields:
        raise ConfigError(f"custom task {cfg.name}: input_template {cfg.input_template!r} uses no field")
    regression = bool(set(cfg.metrics) & REGRESSION_METRICS)

    roots = sorted({re.split(r"[.\[]", f)[0] for f in fields})

    def inputs_of(row: Mapping[str, Any]) -> str:
        # ``datasets`` fills a field absent from one row with None: that is a missing field too.
        for root in roots:
            if row.get(root) is None:
                raise MalformedRow(f"missing field {root!r} used by input_template")
        return cfg.input_template.format_map(row)

    if cfg.label_words is not None:
        words = tuple(cfg.label_words)

        def preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
            label = _class_label(row, cfg.label_field, words)
            return [Example(inputs_of(row), words[label], {"label": label})]

        return preprocess, label_postprocessor(words), words

    target_field = cfg.target_field

    def preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
        if regression:
            value = _float(row, target_field)
            return [Example(inputs_of(row), f"{value:g}", {"label": value})]
        target = _text(row, target_field)
        return [Example(inputs_of(row), target, {"label": target})]

    return preprocess, float_postprocess if regression else text_postprocess, None


def task_prefix(spec: TaskSpec, input_template: str | None = None) -> str:
    """The text ``data.task_prefix`` puts in front of a task's inputs: ``""`` for GLUE/SuperGLUE
    (their inputs begin with the task's name already, T5's format) and for a custom task whose
    ``input_template`` begins with text of its own (the template already says how the task is
    given), ``"<name after the last />: "`` otherwise."""
    if spec.benchmark is not None:
        return ""
    if input_template is not None and not input_template.startswith("{"):
        return ""
    return spec.name.rsplit("/", 1)[-1] + ": "


def input_prefixes(cfg: DataConfig) -> dict[str, str]:
    """Each configured task's input prefix under ``cfg`` (all ``""`` without ``data.task_prefix``):
    what a user of an export must put before the inputs, as training and ``predict`` do."""
    templates = {custom.name: custom.input_template for custom in cfg.custom_tasks}
    specs = [REGISTRY[name] for name in cfg.tasks] + [_custom_spec(custom) for custom in cfg.custom_tasks]
    return {spec.name: task_prefix(spec, templates.get(spec.name)) if cfg.task_prefix else "" for spec in specs}


def _prefixed(spec: TaskSpec, prefix: str) -> TaskSpec:
    if not prefix:
        return spec
    inner = spec.preprocess

    def preprocess(row: Mapping[str, Any], training: bool) -> list[Example]:
        return [Example(prefix + e.inputs, e.targets, e.reference) for e in inner(row, training)]

    return dataclasses.replace(spec, preprocess=preprocess)


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps([PREPROCESSING_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tasks(cfg: DataConfig) -> list[Task]:
    """The run's tasks in id order: ``cfg.tasks`` then ``cfg.custom_tasks``.

    Raises ``DataError`` for an unknown registry name (listing the known ones), a duplicate, or
    an empty task list, and ``ConfigError`` for an inconsistent custom task."""
    if not cfg.tasks and not cfg.custom_tasks:
        raise DataError(f"no tasks configured; data.tasks takes names from: {', '.join(REGISTRY)}")
    names = list(cfg.tasks) + [c.name for c in cfg.custom_tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"task {duplicates[0]!r} is configured twice")
    for name in cfg.tasks:
        if name not in REGISTRY:
            raise DataError(f"unknown task {name!r}; known tasks: {', '.join(REGISTRY)} (or define it in custom_tasks)")
    for custom in cfg.custom_tasks:
        if custom.name in REGISTRY:
            raise DataError(f"custom task {custom.name!r} has the name of a registry task")
    for name in cfg.eval_splits:
        if name not in names:
            raise DataError(f"data.eval_splits names {name!r}, which is not a configured task")

    ids = {name: i for i, name in enumerate(names)}
    data_dir = cfg.resolved_data_dir()
    # (spec, folder, data files, fingerprint): registry tasks read data_dir/<name>, custom
    # tasks their own path and files, and a custom task's whole config is its fingerprint.
    entries = [(REGISTRY[name], str(data_dir / name), (), _fingerprint(name)) for name in cfg.tasks]
    entries += [(_custom_spec(custom), custom.path, tuple(sorted(custom.data_files.items())),
                 _fingerprint(to_dict(custom))) for custom in cfg.custom_tasks]
    if cfg.task_prefix:
        prefixes = [input_prefixes(cfg)[spec.name] for spec, *_ in entries]
        # The prefix is part of the preprocessing, so of the tokenisation cache key.
        entries = [(_prefixed(spec, prefix), folder, files, _fingerprint(fingerprint, prefix) if prefix else fingerprint)
                   for (spec, folder, files, fingerprint), prefix in zip(entries, prefixes)]
    return [
        Task.of(
            spec,
            # A task cast as another configured task (AX-b -> superglue/rte) is scored with its id.
            task_id=ids[spec.evaluate_as] if spec.evaluate_as in ids else ids[spec.name],
            eval_splits=tuple(cfg.eval_splits.get(spec.name, spec.eval_splits)),
            source=TaskSource(folder=folder, data_files=data_files, hub=spec.hub if cfg.hub else None),
            fingerprint=fingerprint,
        )
        for spec, folder, data_files, fingerprint in entries
    ]


def benchmark_average(
    task_scores: Mapping[str, float | Mapping[str, float]], require_complete: bool = True
) -> dict[str, float]:
    """GLUE and SuperGLUE averages as the leaderboards define them.

    ``task_scores`` maps eval-set names (``Task.eval_set_name``) to a task's ``metrics()``
    dict or directly to its ``score``. A task's score is the mean of its official metrics
    (MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman; CB: macro-F1 and accuracy;
    MultiRC: F1a and EM; ReCoRD: F1 and EM); MNLI's is the mean of matched and mismatched.
    The GLUE average is the mean over its nine tasks, WNLI included; the SuperGLUE average the
    mean over its eight tasks; the diagnostics (AX-b, AX-g) are not averaged.

    Returns ``{"glue_average": ..., "superglue_average": ...}`` for each benchmark with all its
    tasks present, or with ``require_complete=False`` over the tasks present (at least one)."""

    def score(value: float | Mapping[str, float]) -> float:
        return float(value["score"] if isinstance(value, Mapping) else value)

    out = {}
    for benchmark in BENCHMARKS:
        members = [s for s in _SPECS if s.benchmark == benchmark and s.in_benchmark_average]
        per_task = []
        complete = True
        for spec in members:
            names = [eval_set_name(spec.name, spec.eval_splits, split) for split in spec.eval_splits]
            present = [score(task_scores[n]) for n in names if n in task_scores]
            if len(present) == len(names):
                per_task.append(sum(present) / len(present))
            else:
                complete = False
        if per_task and (complete or not require_complete):
            out[f"{benchmark}_average"] = sum(per_task) / len(per_task)
    return out
