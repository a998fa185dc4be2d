"""The ZeRO stage and sizes the project chooses (training/parallelism.py), and that explicit
ds_config values win."""

import json

import pytest

from hp_deepspeed.config import ConfigError
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.conditioning import ConditioningConfig
from hp_deepspeed.training import parallelism
from hp_deepspeed.training.ds_config import build_ds_config
from hp_deepspeed.training.optim import OptimConfig
from hp_deepspeed.training.parallelism import Hardware, ModelSize, choose_stage, sizes

H100, H200 = 80.0, 141.0


def size_of(preset, freeze=False):
    cond = ConditioningConfig(variant="hyperprompt_global", freeze_backbone=freeze)
    return ModelSize.of(ModelConfig(name_or_path=preset, load_weights=False), cond, 8)


@pytest.fixture(scope="module")
def sizes_by_preset():
    return {"large": size_of("t5-large"), "xl": size_of("google/t5-v1_1-xl"),
            "xxl": size_of("google/t5-v1_1-xxl"), "xxl_frozen": size_of("google/t5-v1_1-xxl", freeze=True)}


def test_model_size_counts_the_trainers_model(sizes_by_preset):
    large, frozen = sizes_by_preset["large"], sizes_by_preset["xxl_frozen"]
    assert 7.3e8 < large.total_params < 7.8e8 and large.trainable_params == large.total_params
    assert large.largest_param == 32128 * 1024  # the shared embedding
    # A decoder block: self- and cross-attention (4 x 1024 x 1024 each) and the FFN (2 x 1024 x 4096).
    assert large.block_params >= 8 * 1024 * 1024 + 2 * 1024 * 4096
    assert frozen.trainable_params < 0.01 * frozen.total_params


@pytest.mark.parametrize("model, world, gpu, stage", [
    ("large", 1, H100, 0),        # fits replicated: no ZeRO-3 hooks on one GPU
    ("large", 8, H100, 2),        # several GPUs: optimizer and gradients partitioned
    ("xl", 1, H100, 0),           # too large for the share, but ZeRO-3 shards nothing on one GPU
    ("xl", 8, H100, 2),
    ("xxl", 1, H100, 0),          # (needs offload: the plan tool says so)
    ("xxl", 8, H100, 3),          # 11B x 2 bytes of bf16 weights alone take a third of the budget
    ("xxl_frozen", 1, H200, 0),   # frozen backbone: only its bf16 weights, 22 GB
])
def test_stage_three_only_when_it_must(sizes_by_preset, model, world, gpu, stage):
    assert choose_stage(sizes_by_preset[model], Hardware(world, gpu))[0] == stage


def test_host_memory_of_eight_ranks_building_an_xxl_forces_zero3(sizes_by_preset):
    # 8 x 11B x 4 bytes of fp32 weights built per rank before the engine: ZeRO-3's zero.Init avoids it.
    node = Hardware(8, H100, host_mem_gib=512, ranks_per_node=8)
    stage, reason = choose_stage(sizes_by_preset["xxl_frozen"], node)
    assert stage == 3 and "GiB of fp32 weights" in reason
    assert choose_stage(sizes_by_preset["large"], node)[0] == 2


def test_cpu_replicates():
    assert choose_stage(ModelSize(10**6, 10**6, 10**5, 10**5), Hardware(2, None))[0] == 0


def test_sizes_fix_the_hf_rule_for_t5_large(sizes_by_preset):
    large = sizes_by_preset["large"]
    one, eight = sizes(large, 1024, Hardware(1, H100)), sizes(large, 1024, Hardware(8, H100))
    # The HF rule's 0.94M prefetch bucket was smaller than one FFN weight (4.2M): no prefetch.
    assert one["stage3_prefetch_bucket_size"] >= 2 * large.block_params
    # A handful of reduce flushes per step instead of ~700 d_model^2 buckets.
    assert large.trainable_params / one["reduce_bucket_size"] <= 4
    assert one["reduce_bucket_size"] <= parallelism.MAX_BUCKET
    # One rank keeps every parameter gathered; several keep DeepSpeed's default.
    assert one["stage3_param_persistence_threshold"] > large.largest_param
    assert eight["stage3_param_persistence_threshold"] == parallelism.MULTI_RANK_PERSISTENCE


def build(zero, world=1, size=None):
    return build_ds_config({"bf16": {"enabled": True}, "zero_optimization": zero}, micro_batch_size=2,
                           gradient_accumulation=1, world_size=world, optim=OptimConfig(), d_model=1024,
                           log_every=10, on_cpu=True, model_size=size)["zero_optimization"]


def test_explicit_values_win_and_auto_is_filled_from_parallelism(sizes_by_preset):
    large = sizes_by_preset["large"]
    zero = build({"stage": 3, "reduce_bucket_size": 123, "stage3_prefetch_bucket_size": "auto"}, size=large)
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 123
    # The value comes from the one module that decides it (ds_config.py has no rule of its own).
    assert zero["stage3_prefetch_bucket_size"] == sizes(large, 1024, Hardware(1, None))["stage3_prefetch_bucket_size"]
    auto = build({"stage": "auto", "reduce_bucket_size": "auto"}, size=large)
    # parallelism replicates (stage 0); bf16 weights with fp32 accumulation run that as DeepSpeed's
    # stage-1 BF16_Optimizer (ds_config.py), the only engine it has for those data types.
    assert auto["stage"] == 1 and "auto" not in json.dumps(auto)
    fp32 = build_ds_config({"zero_optimization": {"stage": "auto"}}, micro_batch_size=2, gradient_accumulation=1,
                           world_size=1, optim=OptimConfig(), d_model=1024, log_every=10, on_cpu=True,
                           model_size=large)
    assert fp32["zero_optimization"]["stage"] == 0


def test_auto_stage_needs_the_model_size():
    with pytest.raises(ConfigError, match='stage "auto" needs the model size'):
        build({"stage": "auto"})


def test_zero3_keeps_torchs_linear_unless_the_file_asks():
    assert build({"stage": 3})["memory_efficient_linear"] is False
    assert build({"stage": 3, "memory_efficient_linear": True})["memory_efficient_linear"] is True
    assert "memory_efficient_linear" not in build({"stage": 2})


def test_leaf_blocks_only_under_zero3_and_never_a_stacks_first_block():
    """Each stack's first block holds the position-bias table the stack calls outside the block
    (t5.T5Model.zero3_leaf_blocks); the conditioning keeps DeepSpeed's per-module hooks."""
    from deepspeed.utils import z3_leaf_module

    from hp_deepspeed.model.hyperprompt_t5 import build_model

    model = build_model(ModelConfig(name_or_path="tiny-v1_0"), ConditioningConfig(variant="hyperprompt_global"), 4)
    assert parallelism.mark_leaf_blocks(model, {"zero_optimization": {"stage": 2}}) == 0
    assert parallelism.mark_leaf_blocks(model, {"zero_optimization": {"stage": 3}}, enabled=False) == 0
    assert not any(z3_leaf_module(m) for m in model.modules())
    assert parallelism.mark_leaf_blocks(model, {"zero_optimization": {"stage": 3}}) == 3
    leaves = {name for name, m in model.named_modules() if z3_leaf_module(m)}
    assert leaves == {"backbone.encoder.block.1", "backbone.decoder.block.1", "backbone.decoder.block.2"}
