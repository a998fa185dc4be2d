"""Mixture sampling, sharding over ranks, resumable state, batch format and padding."""

from __future__ import annotations

import collections
import json
import re
import zlib

import numpy as np
import pytest
import torch

from bench.batching import measure
from hp_deepspeed.data import DataError, TrainStream, build_tasks, mixing_rates

SYNTH = ["synthetic/copy", "synthetic/reverse"]


def stream(make_cfg, tokenizer, tasks, micro_batch_size=4, rank=0, world_size=1, accumulation=1, **cfg):
    cfg.setdefault("bucket_pool_batches", 10)
    config = make_cfg(tasks=tasks, **cfg)
    return TrainStream(config, build_tasks(config), tokenizer, micro_batch_size, rank, world_size, accumulation=accumulation)


def rows(batch):
    """The examples of a batch as hashable (task id, unpadded input ids)."""
    return [
        (int(t), tuple(ids[mask.bool()].tolist()))
        for t, ids, mask in zip(batch["task_ids"], batch["input_ids"], batch["attention_mask"])
    ]


def test_mixing_rates_by_hand(make_cfg):
    names, sizes = ["a", "b", "c"], [1000, 12, 12]
    cap = mixing_rates(make_cfg(mixture_cap=100), names, sizes)
    np.testing.assert_allclose(cap, [100 / 124, 12 / 124, 12 / 124])
    temp = mixing_rates(make_cfg(mixture="temperature", temperature=2.0, mixture_cap=None), names, sizes)
    root = np.sqrt([1000, 12, 12])
    np.testing.assert_allclose(temp, root / root.sum())
    # The cap applies before the temperature: with cap 100 the big task counts as 100, not 1000.
    capped = mixing_rates(make_cfg(mixture="temperature", temperature=2.0, mixture_cap=100), names, sizes)
    root = np.sqrt([100, 12, 12])
    np.testing.assert_allclose(capped, root / root.sum())
    weights = mixing_rates(make_cfg(mixture="weights", weights={"a": 1, "b": 2, "c": 1}), names, sizes)
    np.testing.assert_allclose(weights, [0.25, 0.5, 0.25])
    with pytest.raises(DataError, match=r"missing \['c'\]"):
        mixing_rates(make_cfg(mixture="weights", weights={"a": 1, "b": 2}), names, sizes)


CUBE_ROOTS = np.cbrt([100, 12, 12])


# The three tasks have 1000, 12 and 12 training examples; the expected rates are computed by hand
# here (not taken from the stream), each with a cap that binds.
@pytest.mark.parametrize(
    "mixture, rates",
    [(dict(mixture="proportional", mixture_cap=100), np.array([100, 12, 12]) / 124),
     (dict(mixture="temperature", temperature=3.0, mixture_cap=100), CUBE_ROOTS / CUBE_ROOTS.sum()),
     (dict(mixture="weights", weights={"synthetic/copy": 1.0, "glue/rte": 2.0, "superglue/cb": 1.0}),
      np.array([0.25, 0.5, 0.25]))],
)
def test_sampled_proportions(make_cfg, tokenizer, mixture, rates):
    s = stream(make_cfg, tokenizer, ["synthetic/copy", "glue/rte", "superglue/cb"], micro_batch_size=100, **mixture)
    assert s.sizes == [1000, 12, 12]
    draws = np.concatenate([s.next_global_batch()[:, 0] for _ in range(100)])  # 10,000 draws
    freq = np.bincount(draws, minlength=3) / len(draws)
    # binomial standard deviation is at most 0.005 here; 0.02 is four of them
    np.testing.assert_allclose(freq, rates, atol=0.02)
    np.testing.assert_allclose(s.rates, rates)


def test_batch_format(make_cfg, tokenizer):
    # one row per example (data.packing: auto would pack this one-rank stream; see test_packing.py)
    s = stream(make_cfg, tokenizer, ["glue/rte", "synthetic/sort"], micro_batch_size=6, packing=False)
    batch = next(s)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].shape[0] == 6
    assert batch["task_ids"].shape == (6,)
    assert ((batch["input_ids"] == tokenizer.pad_token_id) == (batch["attention_mask"] == 0)).all()
    for labels, ids, mask in zip(batch["labels"], batch["input_ids"], batch["attention_mask"]):
        real = labels[labels != -100]
        assert real[-1] == tokenizer.eos_token_id and (labels[len(real):] == -100).all()
        assert ids[int(mask.sum()) - 1] == tokenizer.eos_token_id


def test_seed_determines_stream(make_cfg, tokenizer):
    a = [s.next_global_batch() for s in [stream(make_cfg, tokenizer, SYNTH, seed=1)] for _ in range(5)]
    b = [s.next_global_batch() for s in [stream(make_cfg, tokenizer, SYNTH, seed=1)] for _ in range(5)]
    c = [s.next_global_batch() for s in [stream(make_cfg, tokenizer, SYNTH, seed=2)] for _ in range(5)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))


def test_resume_gives_same_next_100_batches(make_cfg, tokenizer):
    s = stream(make_cfg, tokenizer, SYNTH + ["glue/rte"], micro_batch_size=4, rank=1, world_size=2)
    for _ in range(37):  # mid-pool (10 batches per pool)
        next(s)
    state = json.loads(json.dumps(s.state_dict()))  # the checkpoint holds plain JSON
    expected = [next(s) for _ in range(100)]
    resumed = stream(make_cfg, tokenizer, SYNTH + ["glue/rte"], micro_batch_size=4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_ranks_never_share_an_example_in_an_epoch(make_cfg, tokenizer):
    """One task of 1000 examples, 2 ranks x 8, pools of 10 global batches: the first 60 steps
    (6 pools, 960 draws) are all in epoch 0; pool 6 straddles the epoch boundary."""
    ranks = [stream(make_cfg, tokenizer, ["synthetic/copy"], micro_batch_size=8, rank=r, world_size=2) for r in (0, 1)]
    seen = [[row for _ in range(60) for row in rows(next(s))] for s in ranks]
    assert len(set(seen[0])) == len(seen[0]) == 480 and len(set(seen[1])) == 480
    assert not set(seen[0]) & set(seen[1])
    # the rest of epoch 0 (40 examples) is in pool 6, mixed with the start of epoch 1
    rest = [row for _ in range(10) for s in ranks for row in rows(next(s))]
    epoch0 = set(seen[0]) | set(seen[1])
    assert len(set(rest) - epoch0) == 40


def test_each_epoch_is_a_permutation(make_cfg, tokenizer):
    """glue/rte has 12 examples: every run of 12 consecutive draws of it is one epoch."""
    s = stream(make_cfg, tokenizer, ["glue/rte", "synthetic/copy"], micro_batch_size=16, mixture_cap=24)
    drawn = np.concatenate([s.next_global_batch() for _ in range(30)])
    # stream order within a batch is by length; the per-epoch cursor order is what matters,
    # so count how often each example was drawn: epochs complete before one repeats
    rte = drawn[drawn[:, 0] == 0, 1]
    counts = np.bincount(rte, minlength=12)
    assert counts.max() - counts.min() <= 1
    assert len(rte) > 36


def test_resume_on_other_world_size_continues_global_stream(make_cfg, tokenizer):
    tasks = SYNTH + ["superglue/cb"]
    two = [stream(make_cfg, tokenizer, tasks, micro_batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(13):
        for s in two:
            next(s)
    state = two[0].state_dict()
    four = [stream(make_cfg, tokenizer, tasks, micro_batch_size=2, rank=r, world_size=4) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    for _ in range(25):  # crosses pool boundaries
        before = collections.Counter(row for s in two for row in rows(next(s)))
        after = collections.Counter(row for s in four for row in rows(next(s)))
        assert before == after


def test_resume_with_other_global_batch_moves_to_next_pool(make_cfg, tokenizer):
    s = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=8)
    for _ in range(3):
        s.next_global_batch()
    state = s.state_dict()
    pool_counts = s._make_pool(0, [0, 0], 8, 10).counts
    other = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=6)
    other.load_state_dict(state)
    new = other.state_dict()
    assert (new["pool"], new["batch_in_pool"], new["offsets"]) == (1, 0, pool_counts)


def test_resume_with_other_global_batch_at_a_pool_boundary_skips_nothing(make_cfg, tokenizer):
    s = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=8)
    for _ in range(21):  # pools 0 and 1 consumed, one batch into pool 2
        s.next_global_batch()
    one_in = s.state_dict()
    assert (one_in["pool"], one_in["batch_in_pool"]) == (2, 1)
    pool_counts = s._make_pool(2, one_in["offsets"], 8, 10).counts
    other = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=6)
    other.load_state_dict(one_in)
    new = other.state_dict()
    assert (new["pool"], new["batch_in_pool"]) == (3, 0)
    assert new["offsets"] == [o + c for o, c in zip(one_in["offsets"], pool_counts)]
    at_boundary = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=8)
    for _ in range(20):
        at_boundary.next_global_batch()
    state = at_boundary.state_dict()
    assert (state["pool"], state["batch_in_pool"]) == (2, 0)
    other = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=6)
    other.load_state_dict(state)
    assert other.state_dict()["pool"] == 2 and other.state_dict()["offsets"] == state["offsets"]


def test_resume_refuses_another_version_or_other_rates(make_cfg, tokenizer):
    state = stream(make_cfg, tokenizer, SYNTH).state_dict()
    with pytest.raises(ValueError, match="data stream state version 0, expected 1"):
        stream(make_cfg, tokenizer, SYNTH).load_state_dict({**state, "version": 0})
    nudged = [state["rates"][0] + 1e-9, state["rates"][1] - 1e-9]  # any change of the mixture
    with pytest.raises(ValueError, match=re.escape(f"mixing rates were {nudged}, are {state['rates']}")):
        stream(make_cfg, tokenizer, SYNTH).load_state_dict({**state, "rates": nudged})


def test_sharding_arguments_are_checked(make_cfg, tokenizer):
    for bad in (dict(micro_batch_size=0), dict(world_size=0, rank=0), dict(rank=2, world_size=2), dict(rank=-1),
                dict(accumulation=0)):
        with pytest.raises(ValueError, match="bad sharding: micro_batch_size=.* rank=.* world_size=.* accumulation="):
            stream(make_cfg, tokenizer, SYNTH, **bad)
    with pytest.raises(ValueError, match="data.bucket_pool_batches must be >= 1, got 0"):
        stream(make_cfg, tokenizer, SYNTH, bucket_pool_batches=0)
    s = stream(make_cfg, tokenizer, SYNTH, micro_batch_size=1, rank=1, world_size=2)
    assert (s.micro_batch_size, s.global_batch_size, s.skipped) == (1, 2, {"synthetic/copy": 0, "synthetic/reverse": 0})
    config = make_cfg(tasks=SYNTH, seed=3)
    default = TrainStream(config, build_tasks(config), tokenizer, 4)  # rank 0 of world size 1 by default
    assert (default.world_size, default.global_batch_size, default.seed) == (1, 4, 3)
    assert TrainStream(config, build_tasks(config), tokenizer, 4, seed=5).seed == 5  # the trainer's run seed wins


def test_mixing_settings_are_validated(make_cfg):
    names, sizes = ["a", "b", "c"], [10, 20, 30]
    with pytest.raises(ValueError, match="data.weights must be >= 0"):  # refused with the config
        make_cfg(mixture="weights", weights={"a": -1, "b": 2, "c": 1})
    for weights, error in (({"a": 0, "b": 0, "c": 0}, "not all zero"),
                           ({"a": 1, "b": 1, "c": 1, "d": 1}, r"missing \[\], not training tasks \['d'\]")):
        with pytest.raises(DataError, match=error):
            mixing_rates(make_cfg(mixture="weights", weights=weights), names, sizes)
    # Zero and fractional weights summing to one are fine.
    rates = mixing_rates(make_cfg(mixture="weights", weights={"a": 0, "b": 0.25, "c": 0.75}), names, sizes)
    np.testing.assert_allclose(rates, [0, 0.25, 0.75])
    for temperature in (0.0, -1.0):  # refused with the config
        with pytest.raises(ValueError, match=f"data.temperature must be > 0, got {temperature}"):
            make_cfg(mixture="temperature", temperature=temperature)
    sharp = mixing_rates(make_cfg(mixture="temperature", temperature=0.5), names, sizes)  # T < 1 sharpens
    np.testing.assert_allclose(sharp, np.square(sizes) / np.square(sizes).sum())


def test_resume_refuses_another_stream(make_cfg, tokenizer):
    state = stream(make_cfg, tokenizer, SYNTH, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        stream(make_cfg, tokenizer, SYNTH, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="tasks"):
        stream(make_cfg, tokenizer, SYNTH[:1], seed=1).load_state_dict(state)


def test_eval_only_tasks_are_not_trained(make_cfg, tokenizer):
    s = stream(make_cfg, tokenizer, ["superglue/rte", "superglue/axb"])
    assert [t.name for t in s.tasks] == ["superglue/rte"]
    with pytest.raises(DataError, match="has a training split"):
        stream(make_cfg, tokenizer, ["superglue/axb"])


def test_default_batches_follow_the_mixture_and_pad_little_on_glue_like_mix(session_cache):
    """8 GLUE-like tasks at equal rates, global batch 16 x 8 ranks (bench/batching.py)."""
    result = measure(examples=600, micro_batch_size=16, ranks=8, batches=30, pool_batches=40, cache_dir=session_cache)
    assert result["default_meets_targets"]
    # at 8 ranks a micro-batch already holds similar lengths: the default does not pack
    assert result["default"]["rows"] == result["stratified"]["rows"] == 16
    assert result["default"]["real_token_fraction"] == result["stratified"]["real_token_fraction"]
    assert result["stratified"]["real_token_fraction"] >= 0.9
    assert result["stratified"]["largest_share_over_rate"] <= 1.25
    # what the modes trade: length sorting clusters batches by task, random batches pad a lot
    assert result["length"]["largest_share_over_rate"] > 2
    assert result["random"]["real_token_fraction"] < 0.8


def test_stratified_batches_hold_every_task_at_its_rate(make_cfg, tokenizer):
    s = stream(make_cfg, tokenizer, ["synthetic/copy", "synthetic/first", "glue/rte"], micro_batch_size=8,
               world_size=3, mixture="weights", weights={"synthetic/copy": 2.0, "synthetic/first": 1.0, "glue/rte": 1.0})
    for _ in range(25):
        counts = np.bincount(s.next_global_batch()[:, 0], minlength=3)
        assert np.abs(counts - np.array([12, 6, 6])).max() <= 2, counts


def reference_global_batches(s: TrainStream, count: int) -> list[np.ndarray]:
    """The global batches as the stream defined them before ranks took only their share: the
    whole pool sorted with per-task and per-batch lexsorts, every batch materialised. Kept as an
    independent oracle of the stream's definition (module docstring of data/stream.py)."""
    out, pool_index, offsets = [], 0, [0] * len(s.tasks)
    size = s.global_batch_size * s.pool_batches
    while len(out) < count:
        draws = np.random.default_rng([s.seed, pool_index, 0]).choice(len(s.tasks), size=size, p=s.rates)
        examples = np.empty(size, dtype=np.int64)
        for k in range(len(s.tasks)):
            where = np.flatnonzero(draws == k)
            positions = np.arange(offsets[k], offsets[k] + len(where))
            for at, position in zip(where, positions):  # epoch after epoch of a fresh permutation
                epoch, within = divmod(int(position), s.sizes[k])
                rng = np.random.default_rng([s.seed, zlib.crc32(s.tasks[k].name.encode()), epoch])
                examples[at] = rng.permutation(s.sizes[k])[within]
            offsets[k] += len(where)
        in_len = np.array([s.splits[k].input_lengths[i] for k, i in zip(draws, examples)])
        tgt_len = np.array([s.splits[k].target_lengths[i] for k, i in zip(draws, examples)])
        if s.batch_mixing == "stratified":
            quantile = np.empty(size)
            for k in np.unique(draws):
                where = np.flatnonzero(draws == k)
                ranked = where[np.lexsort((where, tgt_len[where], in_len[where]))]
                quantile[ranked] = (np.arange(len(ranked)) + 0.5) / len(ranked)
            order = np.lexsort((draws, quantile))
        else:
            order = np.lexsort((np.arange(size), tgt_len, in_len))
        batches = []
        for part in np.split(order, s.pool_batches):
            part = part[np.lexsort((part, tgt_len[part], in_len[part]))]
            batches.append(np.stack([draws[part], examples[part]], axis=1))
        shuffle = np.random.default_rng([s.seed, pool_index, 1]).permutation(s.pool_batches)
        out += [batches[i] for i in shuffle]
        pool_index += 1
    return out[:count]


@pytest.mark.parametrize("mixing", ["stratified", "length"])
@pytest.mark.parametrize("world_size", [1, 3, 8, 32])
def test_each_rank_gets_its_slice_of_the_reference_global_batches_bit_for_bit(make_cfg, tokenizer, mixing, world_size):
    """A rank sorts and gathers only its own share; the shares are the ranks' slices of the
    global batches as defined by the whole-pool oracle above, across pool boundaries."""
    tasks = ["synthetic/copy", "synthetic/reverse", "glue/rte", "superglue/cb"]
    micro, batches = 3, 14  # pools of 5 batches: crosses two boundaries
    ranks = [stream(make_cfg, tokenizer, tasks, micro_batch_size=micro, rank=r, world_size=world_size,
                    bucket_pool_batches=5, batch_mixing=mixing) for r in range(world_size)]
    expected = reference_global_batches(ranks[0], batches)
    from hp_deepspeed.data.stream import collate
    for want in expected:
        assert np.array_equal(ranks[0].next_global_batch(), want)
    for r, s in enumerate(ranks[1:], start=1) if world_size > 1 else []:
        for want in expected:
            share = want[r * micro:(r + 1) * micro]
            got = next(s)
            reference = collate(s.splits, [(int(k), int(i)) for k, i in share], s._task_ids, s.pad_id)
            assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert [s.state_dict() for s in ranks[1:]] == [ranks[0].state_dict()] * (world_size - 1)


def test_vectorised_collation_equals_padding_row_by_row(make_cfg, tokenizer):
    from hp_deepspeed.data.stream import LABEL_PAD, collate

    s = stream(make_cfg, tokenizer, ["glue/rte", "synthetic/sort", "synthetic/copy"], micro_batch_size=24, packing=False)
    for _ in range(5):
        items = s.next_global_batch()
        inputs = [s.splits[k].inputs(i) for k, i in items]
        targets = [s.splits[k].targets(i) for k, i in items]
        want_ids = torch.full((len(items), max(map(len, inputs))), s.pad_id)
        want_mask = torch.zeros_like(want_ids)
        want_labels = torch.full((len(items), max(map(len, targets))), LABEL_PAD)
        for row, (x, y) in enumerate(zip(inputs, targets)):
            want_ids[row, :len(x)], want_mask[row, :len(x)] = torch.tensor(x.tolist()), 1
            want_labels[row, :len(y)] = torch.tensor(y.tolist())
        for got in (collate(s.splits, items, s._task_ids, s.pad_id), s.collate(items)):  # generic, the stream's
            assert torch.equal(got["input_ids"], want_ids) and torch.equal(got["attention_mask"], want_mask)
            assert torch.equal(got["labels"], want_labels)
            assert got["task_ids"].tolist() == [s._task_ids[k] for k in items[:, 0]]
            assert all(v.dtype == torch.long for v in got.values())


def test_accumulation_micro_steps_get_the_slices_more_ranks_would_get(make_cfg, tokenizer):
    """G = 3 x 4: one rank with 4 micro-steps, 2 ranks with 2, 4 ranks with 1 see the same
    micro-batches; micro-step a of rank r is the slice (a * world_size + r) of the global batch."""
    tasks = SYNTH + ["glue/rte"]
    one = stream(make_cfg, tokenizer, tasks, micro_batch_size=3, accumulation=4, bucket_pool_batches=4)
    two = [stream(make_cfg, tokenizer, tasks, micro_batch_size=3, rank=r, world_size=2, accumulation=2,
                  bucket_pool_batches=4) for r in range(2)]
    four = [stream(make_cfg, tokenizer, tasks, micro_batch_size=3, rank=r, world_size=4, bucket_pool_batches=4)
            for r in range(4)]
    for _ in range(9):  # crosses two pool boundaries
        by_four = [next(s) for s in four]
        by_two = [next(s) for a in range(2) for s in two]  # micro-step a: rank 0, then rank 1
        by_one = [next(one) for _ in range(4)]
        for a, b, c in zip(by_four, by_two, by_one):
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert one.state_dict()["global_batch_size"] == 12 and one.state_dict()["examples_in_batch"] == 0


def test_a_state_saved_mid_step_resumes_where_its_slices_allow(make_cfg, tokenizer):
    def make(**kw):
        return stream(make_cfg, tokenizer, SYNTH, micro_batch_size=2, bucket_pool_batches=3, **kw)

    one = make(accumulation=4)
    for _ in range(6):  # one global batch and two micro-steps into the second
        next(one)
    two_in = json.loads(json.dumps(one.state_dict()))
    assert (two_in["batch_in_pool"], two_in["examples_in_batch"]) == (1, 4)
    expected = [next(one) for _ in range(10)]
    same = make(accumulation=4)
    same.load_state_dict(two_in)
    for want in expected:
        got = next(same)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # four examples taken = one micro-step of 2 ranks x 2: rank 0's next micro-batch is slice 2
    rank0 = make(world_size=2, rank=0, accumulation=2)
    rank0.load_state_dict(two_in)
    got = next(rank0)
    assert all(torch.equal(got[k], expected[0][k]) for k in expected[0])
    # three slices (6 examples) cannot be continued by 2 ranks: the rest of the pool is skipped
    one.load_state_dict(two_in)
    next(one)
    odd = one.state_dict()
    assert odd["examples_in_batch"] == 6
    rank1 = make(world_size=2, rank=1, accumulation=2)
    rank1.load_state_dict(odd)
    assert (rank1.state_dict()["pool"], rank1.state_dict()["batch_in_pool"], rank1.state_dict()["examples_in_batch"]) == (1, 0, 0)
    with pytest.raises(RuntimeError, match="at micro-step 3 of a global batch"):
        one.next_global_batch()


def test_one_rank_with_accumulation_pads_as_little_as_as_many_ranks_and_follows_the_mixture(session_cache):
    """8 GLUE-like tasks at equal rates, 16 per micro-batch, one rank with 8 micro-steps
    (bench/batching.py): the global batch of 128 is cut as 8 ranks would cut it."""
    result = measure(examples=600, micro_batch_size=16, ranks=1, accumulation=8, batches=20, pool_batches=30,
                     cache_dir=session_cache)
    assert result["stratified"]["real_token_fraction"] >= 0.9
    assert result["stratified"]["largest_share_over_rate"] <= 1.25
