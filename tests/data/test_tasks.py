"""Preprocessors (T5's formats), postprocessors and task building, on hand-made rows and on
every bundled file."""

from __future__ import annotations

import json

import pytest

from hp_deepspeed.config import ConfigError
from hp_deepspeed.data import REGISTRY, CustomTaskConfig, DataError, build_eval_batches, build_tasks
from hp_deepspeed.data.tasks import MalformedRow, TaskSource


def task(make_cfg, name):
    (t,) = build_tasks(make_cfg(tasks=[name]))
    return t


def one(t, row, training=False):
    (example,) = t.preprocess(row, training)
    return example


def test_glue_formats(make_cfg):
    rte = one(task(make_cfg, "glue/rte"), {"sentence1": "A b.", "sentence2": "C.", "label": 1, "idx": 0})
    assert (rte.inputs, rte.targets, rte.reference) == ("rte sentence1: A b. sentence2: C.", "not_entailment", {"label": 1})
    mnli = one(task(make_cfg, "glue/mnli"), {"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0})
    assert (mnli.inputs, mnli.targets) == ("mnli hypothesis: H. premise: P.", "contradiction")
    cola = one(task(make_cfg, "glue/cola"), {"sentence": "S.", "label": 1, "idx": 0})
    assert (cola.inputs, cola.targets) == ("cola sentence: S.", "acceptable")
    wnli = one(task(make_cfg, "glue/wnli"), {"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0})
    assert wnli.targets == "entailment"  # WNLI's label order is the reverse of RTE's


@pytest.mark.parametrize("label,target", [(3.9, "4.0"), (2.47, "2.4"), (1.0, "1.0"), (0.1, "0.0"), (5.0, "5.0")])
def test_stsb_rounds_to_fifths(make_cfg, label, target):
    ex = one(task(make_cfg, "glue/stsb"), {"sentence1": "a", "sentence2": "b", "label": label, "idx": 0})
    assert (ex.inputs, ex.targets, ex.reference) == ("stsb sentence1: a sentence2: b", target, {"label": label})


def test_superglue_formats(make_cfg):
    copa = one(task(make_cfg, "superglue/copa"),
               {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 1, "idx": 0})
    assert (copa.inputs, copa.targets) == ("copa choice1: A. choice2: B. premise: P. question: cause", "choice2")
    boolq = one(task(make_cfg, "superglue/boolq"), {"question": "q", "passage": "p", "label": 1, "idx": 0})
    assert (boolq.inputs, boolq.targets) == ("boolq passage: p question: q", "True")
    cb = one(task(make_cfg, "superglue/cb"), {"premise": "p", "hypothesis": "h", "label": 2, "idx": 0})
    assert (cb.inputs, cb.targets) == ("cb hypothesis: h premise: p", "neutral")
    wic = one(task(make_cfg, "superglue/wic"), {"word": "w", "sentence1": "s1", "sentence2": "s2", "label": 0,
                                                 "start1": 0, "end1": 1, "start2": 0, "end2": 1, "idx": 0})
    assert (wic.inputs, wic.targets) == ("wic sentence1: s1 sentence2: s2 word: w", "False")
    axb = one(task(make_cfg, "superglue/axb"), {"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0})
    assert axb.inputs == "rte sentence1: a sentence2: b"
    axg = one(task(make_cfg, "superglue/axg"), {"premise": "p", "hypothesis": "h", "label": 0, "idx": 5})
    assert (axg.inputs, axg.reference) == ("rte hypothesis: h premise: p", {"label": 0, "pair": 2})


def test_multirc_removes_markup_and_groups(make_cfg):
    row = {"paragraph": "<b>Sent 1: </b>A.<br><b>Sent 2: </b>B.<br>", "question": "Q?", "answer": "A",
           "idx": {"paragraph": 3, "question": 7, "answer": 20}, "label": 1}
    ex = one(task(make_cfg, "superglue/multirc"), row)
    assert ex.inputs == "multirc question: Q? answer: A paragraph: Sent 1: A. Sent 2: B. "
    assert (ex.targets, ex.reference) == ("True", {"label": 1, "group": "3-7"})


def test_wsc_marks_spans(make_cfg):
    # T5's example: the pronoun index moves by two once the noun before it is marked.
    text = "Mark told Pete many lies about himself, which Pete included in his book. He should have been more truthful."
    row = {"text": text, "span1_index": 0, "span1_text": "Mark", "span2_index": 13, "span2_text": "He", "label": 1, "idx": 0}
    ex = one(task(make_cfg, "superglue/wsc"), row)
    assert ex.inputs == ("wsc text: * Mark * told Pete many lies about himself, which Pete included in his book. "
                         "# He # should have been more truthful.")
    assert ex.targets == "True"
    with pytest.raises(MalformedRow, match="not at word"):
        one(task(make_cfg, "superglue/wsc"), {**row, "span2_index": 3})


def test_record_highlights_and_answers(make_cfg):
    row = {"passage": "A said hi.\n@highlight\nB went home\n@highlight\nC left", "query": "@placeholder went home",
           "entities": ["A", "B"], "answers": ["B", "B."], "idx": {"passage": 1, "query": 4}}
    t = task(make_cfg, "superglue/record")
    train = t.preprocess(row, training=True)
    assert [e.targets for e in train] == ["B", "B."]
    assert train[0].inputs == "record query: @placeholder went home entities: A, B passage: A said hi. B went home. C left"
    (ev,) = t.preprocess(row, training=False)
    assert ev.reference == {"label": "B", "answers": ["B", "B."], "group": "1-4"}


def test_postprocess(make_cfg):
    assert task(make_cfg, "glue/rte").postprocess(" not_entailment ") == 1
    assert task(make_cfg, "glue/rte").postprocess("maybe") == -1
    assert task(make_cfg, "glue/stsb").postprocess("3.4") == 3.4
    assert task(make_cfg, "glue/stsb").postprocess("x") == -1.0
    assert task(make_cfg, "superglue/record").postprocess(" Liam ") == "Liam"


def test_task_ids_names_and_diagnostics(make_cfg):
    tasks = build_tasks(make_cfg(tasks=["glue/rte", "superglue/rte", "superglue/axb", "synthetic/copy"]))
    assert [(t.name, t.task_id, t.benchmark) for t in tasks] == [
        ("glue/rte", 0, "glue"), ("superglue/rte", 1, "superglue"), ("superglue/axb", 1, "superglue"),
        ("synthetic/copy", 3, None),
    ]
    assert tasks[2].train_split is None and tasks[2].eval_splits == ("test",)
    (axb,) = build_tasks(make_cfg(tasks=["superglue/axb"]))
    assert axb.task_id == 0
    assert tasks[0].label_words == ("entailment", "not_entailment") and tasks[3].label_words is None


def test_what_the_run_adds_to_registry_and_custom_specs(make_cfg):
    """A Task is its spec plus the run's eval splits, data source and fingerprint."""
    custom = CustomTaskConfig(name="my/gen", path="org/data", hub_config="cfg", input_template="q: {a}",
                              target_field="b", data_files={"train": "t.jsonl"}, eval_splits=["dev"])
    cfg = make_cfg(tasks=["glue/rte", "glue/mnli"], custom_tasks=[custom], hub=True,
                   eval_splits={"glue/rte": ["train"]})
    rte, mnli, gen = build_tasks(cfg)
    assert (rte.eval_splits, mnli.eval_splits, gen.eval_splits) == (
        ("train",), ("validation_matched", "validation_mismatched"), ("dev",))
    assert rte.source == TaskSource(str(cfg.resolved_data_dir() / "glue/rte"), (), ("nyu-mll/glue", "rte"))
    assert gen.source == TaskSource("org/data", (("train", "t.jsonl"),), ("org/data", "cfg"))
    assert (gen.benchmark, gen.in_benchmark_average, gen.metric_names) == (None, False, ("accuracy",))
    assert one(gen, {"a": "x", "b": "y"}).inputs == "q: x" and gen.postprocess(" y ") == "y"
    offline = build_tasks(make_cfg(tasks=["glue/rte"], custom_tasks=[custom]))
    assert [t.source.hub for t in offline] == [None, None]
    assert offline[0] == build_tasks(make_cfg(tasks=["glue/rte"]))[0]  # equal tasks compare equal
    other = CustomTaskConfig(**{**custom.__dict__, "input_template": "Q: {a}"})
    assert len({rte.fingerprint, gen.fingerprint, build_tasks(make_cfg(custom_tasks=[other]))[0].fingerprint}) == 3


def test_every_registry_task_end_to_end(make_cfg, tokenizer):
    """Every preprocessor on the bundled files; perfect outputs score 100 on every metric,
    outputs that are never a label word score 0 (or less) on at least one."""
    cfg = make_cfg(tasks=list(REGISTRY))
    eval_sets = build_eval_batches(cfg, build_tasks(cfg), tokenizer, micro_batch_size=4)
    names = [e.name for e in eval_sets]
    assert "glue/mnli_matched" in names and "glue/mnli_mismatched" in names and "superglue/axg" in names
    for eval_set in eval_sets:
        assert len(eval_set) >= 12
        perfect = eval_set.compute_metrics(eval_set.target_texts)
        assert all(v == pytest.approx(100.0, abs=1.0) for v in perfect.values()), (eval_set.name, perfect)
        if eval_set.task.label_words:
            wrong = eval_set.compute_metrics(["<nonsense>"] * len(eval_set))
            assert min(wrong.values()) <= 0.0, (eval_set.name, wrong)


def test_custom_tasks(make_cfg, tokenizer, tmp_path):
    rows = [{"text": f"item {i}", "label": ["neg", "pos"][i % 2], "score": i / 2, "out": f"o{i}"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.csv").write_text("text,label,score,out\nitem 9,1,4.5,o9\nitem 8,0,4.0,o8\n")
    classify = CustomTaskConfig(name="my/cls", path=str(tmp_path), input_template="classify: {text}",
                                label_words=["neg", "pos"], metrics=["accuracy", "f1"])
    regress = CustomTaskConfig(name="my/reg", path=str(tmp_path), input_template="score: {text}",
                               target_field="score", metrics=["pearson"])
    cfg = make_cfg(custom_tasks=[classify, regress])
    cls, reg = build_tasks(cfg)
    assert (cls.task_id, reg.task_id, cls.label_words) == (0, 1, ("neg", "pos"))
    assert one(cls, rows[1]) == one(cls, {"text": "item 1", "label": 1})
    assert one(cls, rows[1]).inputs == "classify: item 1" and one(cls, rows[1]).targets == "pos"
    assert one(reg, rows[3]).targets == "1.5" and reg.postprocess("1.5") == 1.5
    cls_eval, reg_eval = build_eval_batches(cfg, [cls, reg], tokenizer, micro_batch_size=2)
    assert cls_eval.compute_metrics(["pos", "neg"]) == {"accuracy": 100.0, "f1": 100.0, "score": 100.0}
    assert reg_eval.compute_metrics(["4.5", "4.0"])["pearson"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(label_words=["a"], target_field="t"), "exactly one"),
        (dict(label_words=["a"], metrics=["bleu"]), "unknown metric 'bleu'"),
        (dict(target_field="t", input_template="no fields"), "uses no field"),
        (dict(label_words=["a"], metrics=["pearson"]), "label_words takes metrics from"),
        (dict(target_field="t", metrics=["record_f1"]), "target_field takes metrics from"),
        (dict(target_field="t", path=None), "set path"),
    ],
)
def test_custom_task_config_errors(make_cfg, kwargs, match):
    base = dict(name="my/t", path="/nowhere", input_template="{x}")
    with pytest.raises(ConfigError, match=match):
        build_tasks(make_cfg(custom_tasks=[CustomTaskConfig(**{**base, **kwargs})]))


def test_unknown_duplicate_and_no_tasks(make_cfg):
    with pytest.raises(DataError, match=r"unknown task 'glue/rtee'; known tasks: glue/cola, .*superglue/rte"):
        build_tasks(make_cfg(tasks=["glue/rtee"]))
    with pytest.raises(DataError, match="configured twice"):
        build_tasks(make_cfg(tasks=["glue/rte", "glue/rte"]))
    with pytest.raises(DataError, match="no tasks configured"):
        build_tasks(make_cfg())


def test_data_config_loads_strictly_from_yaml_tree():
    from hp_deepspeed.config import from_dict
    from hp_deepspeed.data import DataConfig

    tree = {
        "tasks": ["glue/rte"],
        "custom_tasks": [{"name": "my/t", "path": "/d", "input_template": "c: {text}", "label_words": ["a", "b"]}],
        "mixture": "weights",
        "weights": {"glue/rte": 1, "my/t": 2},
    }
    cfg = from_dict(DataConfig, tree)
    assert cfg.custom_tasks[0].label_words == ["a", "b"] and cfg.weights == {"glue/rte": 1.0, "my/t": 2.0}
    with pytest.raises(ConfigError, match="unknown config key custom_tasks\\[0\\].labels"):
        from_dict(DataConfig, {"custom_tasks": [{"name": "x", "input_template": "{a}", "labels": []}]})
    with pytest.raises(ConfigError, match="mixture: expected one of"):
        from_dict(DataConfig, {"mixture": "uniform"})
