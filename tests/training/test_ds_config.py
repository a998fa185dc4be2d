"""The DeepSpeed config is the ds_configs file plus values written from the trainer config."""

import json
from pathlib import Path

import pytest

from hp_deepspeed.config import ConfigError
from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
from hp_deepspeed.training.optim import OptimConfig, lr_multiplier
from hp_deepspeed.training.parallelism import ModelSize

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_builds(path, monkeypatch):
    monkeypatch.setenv("HP_NVME_PATH", "/local_nvme")
    cfg = build_ds_config(
        read_ds_config(path), micro_batch_size=4, gradient_accumulation=2, world_size=8,
        optim=OptimConfig(lr=1e-4, clip_grad_norm=1.0), d_model=1024, log_every=10, on_cpu=False,
        model_size=ModelSize(total_params=10**9, trainable_params=10**9, largest_param=10**7, block_params=10**7),
    )
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["params"]["lr"] == 1e-4
    assert "auto" not in json.dumps(cfg)
    assert isinstance(cfg["zero_optimization"].get("stage", 0), int)


def test_nvme_path_must_be_set(monkeypatch):
    monkeypatch.delenv("HP_NVME_PATH", raising=False)
    with pytest.raises(ConfigError, match="HP_NVME_PATH is not set"):
        read_ds_config(DS_CONFIGS / "zero3_offload_nvme.json")


def test_trainer_owned_keys_are_rejected(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu.*training\.micro_batch_size"):
        read_ds_config(path)


def test_fp16_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="fp16 is refused for T5.*overflow.*bf16"):
        read_ds_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(bad)


def test_cpu_uses_torch_adam_unless_offloading():
    base = read_ds_config(DS_CONFIGS / "zero3_cpu_test.json")
    cfg = build_ds_config(base, micro_batch_size=1, gradient_accumulation=1, world_size=1,
                          optim=OptimConfig(), d_model=8, log_every=1, on_cpu=True)
    assert cfg["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("constant", 50, 1.0),
        ("linear", 10, 1.0),  # end of warmup
        ("linear", 55, 0.5),  # halfway through the decay
        ("cosine", 55, 0.5),
        ("inverse_sqrt", 39, 0.5),  # sqrt(10 / 40)
    ],
)
def test_schedules(schedule, step, expected):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10)
    assert lr_multiplier(cfg, step, total_steps=100) == pytest.approx(expected)
    assert lr_multiplier(cfg, 0, 100) == pytest.approx(0.1)  # warmup starts above zero
