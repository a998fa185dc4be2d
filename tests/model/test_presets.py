"""Presets and config.json parsing: shapes equal transformers' for every named model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import T5ForConditionalGeneration

from hp_deepspeed.config import ConfigError
from hp_deepspeed.model import PRESETS, ModelConfig, T5Config, T5Model, build_backbone
from hp_deepspeed.testing.tiny_models import hf_config

# Known parameter counts of a few published checkpoints: an anchor independent of transformers.
PUBLISHED = {"t5-small": 60_506_624, "t5-base": 222_903_552, "t5-11b": 11_307_321_344,
             "google/t5-v1_1-xxl": 11_135_332_352}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_parameters_equal_transformers(name):
    config = T5Config.from_pretrained(name)
    with torch.device("meta"):
        ours = T5Model(config)
        hf = T5ForConditionalGeneration(hf_config(config))
        if not config.tie_word_embeddings:
            # transformers 5 ties on construction and unties in from_pretrained when the
            # checkpoint holds a separate lm_head, as every v1.1 checkpoint does.
            hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.lm_head.weight))
    assert all(p.is_meta for p in ours.parameters())
    ours_shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert ours_shapes == hf_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    if name in PUBLISHED:
        assert count == PUBLISHED[name]


def test_build_model_on_meta_counts_without_memory():
    model = build_backbone(ModelConfig(name_or_path="google/flan-t5-xxl", dtype="bfloat16"), device="meta")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) > 11e9


def test_random_tiny_model_and_overrides():
    model = build_backbone(ModelConfig(name_or_path="tiny-v1_1", dropout_rate=0.0, activation_checkpointing="reentrant"))
    assert model.config.dropout_rate == 0.0 and model.encoder.activation_checkpointing == "reentrant"
    assert model.lm_head.weight is not model.shared.weight
    tied = build_backbone(ModelConfig(name_or_path="tiny-v1_0"))
    assert tied.lm_head.weight is tied.shared.weight


def test_config_round_trips_through_config_json(tmp_path):
    for name in ("t5-3b", "google/mt5-base", "tiny-v1_1"):
        config = T5Config.from_pretrained(name)
        (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
        assert T5Config.from_pretrained(tmp_path) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "bart"}, "model_type 'bart' is not supported"),
        ({"model_type": "umt5"}, "model_type 'umt5' is not supported"),
        ({"architectures": ["T5EncoderModel"]}, "architecture 'T5EncoderModel' is not supported"),
        ({"feed_forward_proj": "gated-swish"}, "activation 'swish' is not supported"),
        ({"feed_forward_proj": "relu-gated"}, "expected ACT or gated-ACT"),
    ],
)
def test_unknown_architecture_is_named(tmp_path, change, message):
    data = T5Config.from_pretrained("tiny-v1_0").to_hf_dict()
    data.update(change)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as err:
        T5Config.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        T5Config.from_pretrained(tmp_path / "nowhere")
