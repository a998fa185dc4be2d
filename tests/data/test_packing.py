"""Packed training batches (``data.packing``): the same examples as unpacked, laid out in fewer
rows with segment ids; the stream's draws and state untouched."""

from __future__ import annotations

import numpy as np
import pytest

from hp_deepspeed.config import ConfigError, load_config
from hp_deepspeed.data import TrainStream, build_tasks
from hp_deepspeed.data.config import resolve_packing
from hp_deepspeed.data.stream import pack_rows

TASKS = ["synthetic/copy", "synthetic/reverse", "glue/rte"]


def make_stream(make_cfg, tokenizer, packing: bool, **cfg) -> TrainStream:
    config = make_cfg(tasks=TASKS, bucket_pool_batches=5, packing=packing, **cfg)
    return TrainStream(config, build_tasks(config), tokenizer, micro_batch_size=12)


def unpacked_examples(batch) -> list[tuple]:
    """(task id, input ids, target ids) of each row of an unpacked batch."""
    return [(int(t), tuple(ids[mask.bool()].tolist()), tuple(labels[labels != -100].tolist()))
            for t, ids, mask, labels in zip(batch["task_ids"], batch["input_ids"], batch["attention_mask"], batch["labels"])]


def packed_examples(batch) -> list[tuple]:
    """(task id, input ids, target ids) of each segment of a packed batch, read by segment id."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        for slot, task in enumerate(batch["segment_task_ids"][row].tolist()):
            if task < 0:
                continue
            inputs = batch["input_ids"][row][batch["input_segment_ids"][row] == slot + 1]
            targets = batch["labels"][row][batch["target_segment_ids"][row] == slot + 1]
            out.append((task, tuple(inputs.tolist()), tuple(targets.tolist())))
    return out


def test_a_packed_stream_holds_the_unpacked_streams_examples_and_position(make_cfg, tokenizer):
    plain, packed = make_stream(make_cfg, tokenizer, False), make_stream(make_cfg, tokenizer, True)
    fewer_rows = 0
    for _ in range(12):  # more than two pools
        unpacked_batch, packed_batch = next(plain), next(packed)
        assert sorted(packed_examples(packed_batch)) == sorted(unpacked_examples(unpacked_batch))
        assert packed.state_dict() == plain.state_dict()
        fewer_rows += packed_batch["input_ids"].shape[0] < unpacked_batch["input_ids"].shape[0]
        # segment ids say what is real: padding is pad / -100, and the mask is the input segments
        assert (packed_batch["attention_mask"] == (packed_batch["input_segment_ids"] > 0)).all()
        assert (packed_batch["labels"][packed_batch["target_segment_ids"] == 0] == -100).all()
        assert packed_batch["input_ids"].shape[1] <= 512 and packed_batch["labels"].shape[1] <= 128
    assert fewer_rows >= 6


def test_packing_never_pads_more_than_one_row_per_example_and_keeps_segments_contiguous():
    for seed in range(30):
        check_layout(seed)


def check_layout(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 33))
    in_len = rng.integers(1, 200, n) if seed % 2 else np.exp(rng.normal(3, 1, n)).astype(int).clip(1, 300)
    tgt_len = rng.integers(1, 12, n)
    layout = pack_rows(in_len, tgt_len, 300, 16)
    assert layout.rows * (layout.input_width + layout.target_width) <= n * (in_len.max() + tgt_len.max())
    assert layout.input_width <= 300 and layout.target_width <= 16
    for row in range(layout.rows):
        mine = np.flatnonzero(layout.row == row)
        order = mine[np.argsort(layout.segment[mine])]
        assert layout.segment[order].tolist() == list(range(1, len(mine) + 1))
        for lengths, starts, width in ((in_len, layout.input_start, layout.input_width),
                                       (tgt_len, layout.target_start, layout.target_width)):
            ends = np.cumsum(lengths[order])
            assert starts[order].tolist() == (ends - lengths[order]).tolist()  # end to end, no gaps
            assert ends[-1] <= width
    # a function of the lengths only
    again = pack_rows(in_len, tgt_len, 300, 16)
    assert all(np.array_equal(a, b) for a, b in zip(layout, again))


def test_rows_never_exceed_the_length_bounds_even_when_a_balanced_spread_would():
    # four rows hold the 1712 tokens, but spreading them over four overflows one: one per row
    layout = pack_rows(np.array([512, 300, 300, 300, 300]), np.array([1, 1, 1, 1, 1]), 512, 128)
    assert layout.input_width <= 512 and layout.rows == 5
    layout = pack_rows(np.array([5, 5, 5]), np.array([100, 100, 100]), 512, 128)
    assert layout.target_width <= 128 and layout.rows == 3


def test_packing_with_a_variant_that_conditions_whole_rows_is_refused_in_one_line():
    from hp_deepspeed.training.train_config import JobConfig

    with pytest.raises(ConfigError, match=r"data\.packing: true does not work with conditioning\.variant: adapter"):
        load_config(JobConfig, [], ["data.packing=true", "conditioning.variant=adapter"])
    assert load_config(JobConfig, [], ["data.packing=true", "conditioning.variant=hyperprompt_sep"]).data.packing


def test_auto_packs_only_a_step_of_one_micro_batch_for_a_variant_that_conditions_segments(make_cfg, tokenizer):
    config = make_cfg(tasks=TASKS, bucket_pool_batches=5)
    assert config.packing == "auto"

    def packs(segment_conditioning=True, **sharding) -> bool:
        stream = TrainStream(config, build_tasks(config), tokenizer, 4, segment_conditioning=segment_conditioning, **sharding)
        return "input_segment_ids" in next(stream)

    assert packs()  # one rank, one micro-step: the micro-batch must span every task's lengths
    assert not packs(accumulation=2) and not packs(rank=1, world_size=2)  # cut by length already
    assert not packs(segment_conditioning=False)  # prompt_tuning, hyperformer, adapter
    assert resolve_packing(True, 8, True) and not resolve_packing(False, 1, True)


def test_auto_packing_is_accepted_with_every_variant_and_a_bad_value_is_named(tmp_path):
    from hp_deepspeed.training.train_config import JobConfig

    assert load_config(JobConfig, [], ["conditioning.variant=adapter"]).data.packing == "auto"
    with pytest.raises(ConfigError, match=r"^data\.packing: expected true/false or 'auto', got 'maybe'$"):
        load_config(JobConfig, [], ["data.packing=maybe"])


def test_one_rank_packed_keeps_nine_tenths_real_tokens_and_the_mixture_and_is_the_default(session_cache):
    """8 GLUE-like tasks at equal rates, one micro-batch of 16 per step at one rank
    (bench/batching.py): unpacked it pads to the longest task; packed, the same batches (the
    same largest task share) keep >= 90% real tokens, and that is what the defaults do."""
    from bench.batching import measure

    result = measure(examples=600, micro_batch_size=16, ranks=1, batches=30, pool_batches=200,
                     cache_dir=session_cache, modes=("stratified", "packed", "default"))
    assert result["packed"]["real_token_fraction"] >= 0.9 > result["stratified"]["real_token_fraction"]
    assert result["packed"]["largest_share_over_rate"] == result["stratified"]["largest_share_over_rate"] <= 1.25
    assert result["default_meets_targets"]
    assert result["default"]["real_token_fraction"] == result["packed"]["real_token_fraction"]
