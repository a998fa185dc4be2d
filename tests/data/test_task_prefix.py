"""The paper's multi-task baseline (``conditioning.variant: mtl``): the plain backbone, and every
input names its task in text, as T5's GLUE/SuperGLUE formats already do."""

from __future__ import annotations

import pytest

from hp_deepspeed.config import from_dict
from hp_deepspeed.data import CustomTaskConfig, build_tasks
from hp_deepspeed.data.tasks import task_prefix
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.conditioning import ConditioningConfig
from hp_deepspeed.model.hyperprompt_t5 import build_model
from hp_deepspeed.training.train_config import JobConfig

ROW = {"inputs": "ant tower fox", "targets": "ant"}


def first_example(task, row=ROW):
    (example,) = task.preprocess(row, False)
    return example


def test_task_prefix_names_synthetic_tasks_and_leaves_glue_as_t5_formats_it(make_cfg):
    plain = build_tasks(make_cfg(tasks=["synthetic/first", "glue/rte"]))
    prefixed = build_tasks(make_cfg(tasks=["synthetic/first", "glue/rte"], task_prefix=True))
    assert first_example(plain[0]).inputs == "ant tower fox"
    assert first_example(prefixed[0]).inputs == "first: ant tower fox"
    assert first_example(prefixed[0]).targets == "ant"
    rte = {"sentence1": "a", "sentence2": "b", "label": 0}
    assert first_example(prefixed[1], rte) == first_example(plain[1], rte)
    assert first_example(prefixed[1], rte).inputs.startswith("rte sentence1:")
    # a changed input is a changed tokenisation: the cache key must differ, GLUE's must not
    assert prefixed[0].fingerprint != plain[0].fingerprint
    assert prefixed[1].fingerprint == plain[1].fingerprint


def test_a_custom_template_that_opens_with_text_keeps_its_own_prefix(make_cfg, tmp_path):
    bare = CustomTaskConfig(name="my/echo", path=str(tmp_path), input_template="{inputs}", target_field="targets")
    worded = CustomTaskConfig(name="my/worded", path=str(tmp_path), input_template="say back: {inputs}",
                              target_field="targets")
    echo, said = build_tasks(make_cfg(custom_tasks=[bare, worded], task_prefix=True))
    assert first_example(echo).inputs == "echo: ant tower fox"
    assert first_example(said).inputs == "say back: ant tower fox"
    assert task_prefix(echo, "{inputs}") == "echo: " and task_prefix(said, "say back: {inputs}") == ""


def test_variant_mtl_is_the_plain_backbone_and_switches_the_task_prefix_on():
    job = from_dict(JobConfig, {"conditioning": {"variant": "mtl"}, "data": {"tasks": ["synthetic/copy"]}})
    assert job.data.task_prefix is True
    none = from_dict(JobConfig, {"conditioning": {"variant": "none"}, "data": {"tasks": ["synthetic/copy"]}})
    assert none.data.task_prefix is False
    model_cfg = ModelConfig(name_or_path="configs/models/t5-demo", load_weights=False)
    mtl = build_model(model_cfg, ConditioningConfig(variant="mtl"), num_tasks=3, device="meta")
    plain = build_model(model_cfg, ConditioningConfig(variant="none"), num_tasks=3, device="meta")
    assert mtl.conditioning is None
    assert [(n, p.shape) for n, p in mtl.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]


def test_mtl_with_a_frozen_backbone_is_refused_in_one_line():
    with pytest.raises(ValueError, match="conditioning.freeze_backbone with variant 'mtl' leaves nothing to train"):
        ConditioningConfig(variant="mtl", freeze_backbone=True)
