"""Strict configs: unknown keys, wrong types and bad overrides fail with the dotted key named."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from hp_deepspeed.config import ConfigError, apply_override, from_dict, load_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    """learning rate"""
    steps: int = 10
    kind: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    path: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"inner": {"lr": 2, "tags": ["p", "q"]}, "name": "run"})
    assert cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.tags == ["p", "q"] and cfg.name == "run" and cfg.inner.steps == 10


def test_unknown_key_names_the_dotted_path_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key inner\.lrr; Inner accepts: .*lr"):
        from_dict(Outer, {"inner": {"lrr": 1.0}})


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"inner": {"steps": 1.5}}, r"inner\.steps: expected an integer, got 1\.5"),
        ({"inner": {"steps": True}}, r"inner\.steps: expected an integer"),
        ({"inner": {"lr": "fast"}}, r"inner\.lr: expected a number"),
        ({"inner": {"kind": "c"}}, r"inner\.kind: expected one of \['a', 'b'\]"),
        ({"inner": {"tags": "p"}}, r"inner\.tags: expected a list"),
        ({"inner": {"tags": [1]}}, r"inner\.tags\[0\]: expected a string"),
        ({"inner": 3}, r"inner: expected a mapping"),
    ],
)
def test_wrong_types_are_rejected(tree, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, tree)


def test_optional_accepts_none_and_value():
    assert from_dict(Inner, {"path": None}).path is None
    assert from_dict(Inner, {"path": "/x"}).path == "/x"


def test_yaml_files_merge_then_overrides_win(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("inner:\n  lr: 0.1\n  steps: 5\nname: base\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("inner:\n  steps: 7\n")
    cfg = load_config(Outer, [base, extra], ["inner.lr=3e-4", "inner.tags=[a, b]"])
    assert (cfg.inner.lr, cfg.inner.steps, cfg.inner.tags, cfg.name) == (3e-4, 7, ["a", "b"], "base")
    assert to_dict(cfg)["inner"]["steps"] == 7


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "inner.lr")
    with pytest.raises(ConfigError, match=r"name is not a section"):
        apply_override({"name": "x"}, "name.sub=1")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:1: invalid YAML: expected ',' or '\]', but got '<stream end>'"):
        load_config(Outer, [bad])
    with pytest.raises(ConfigError, match=r"unknown config key inner\.typo"):
        load_config(Outer, [], ["inner.typo=1"])


@pytest.mark.parametrize("override", [
    "run.dir=''", "training.steps=0", "eval.max_new_tokens=0", "optim.warmup_steps=-1", "data.bucket_pool_batches=0",
    "data.mixture_cap=0", "data.weights={glue/rte: -1}", "checkpoint.interval=0", "preemption.check_every=0",
    "conditioning.bottleneck=0",
])
def test_every_sections_range_check_is_a_config_error(override):
    """A ``__post_init__`` value check of any section reaches the user as a ConfigError (one line,
    exit code 2 in the CLI), named by its dotted key, not as a ValueError traceback."""
    from hp_deepspeed.training.train_config import JobConfig

    key = override.split("=")[0].split(".")
    with pytest.raises(ConfigError, match=rf"^{key[0]}\.{key[1]} must be"):
        load_config(JobConfig, [], [override])
