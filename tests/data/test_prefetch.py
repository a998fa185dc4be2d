"""The background batch producer: same batches, the consumer's position in checkpoints, errors
surfaced, clean shutdown."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from hp_deepspeed.data import TrainStream, build_tasks
from hp_deepspeed.data.prefetch import Prefetcher

TASKS = ["synthetic/copy", "synthetic/reverse", "glue/rte"]


def stream(make_cfg, tokenizer, **kwargs):
    config = make_cfg(tasks=TASKS, bucket_pool_batches=5)
    return TrainStream(config, build_tasks(config), tokenizer, micro_batch_size=4, rank=1, world_size=2, **kwargs)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_state_after_n_consumed_batches_is_the_plain_streams_state_after_n(make_cfg, tokenizer):
    plain = stream(make_cfg, tokenizer)
    prefetched = Prefetcher(stream(make_cfg, tokenizer), depth=3)
    try:
        assert prefetched.state_dict() == plain.state_dict()  # nothing consumed yet
        for n in range(1, 13):  # crosses pool boundaries (5 batches per pool)
            assert same(next(prefetched), next(plain))
            # the producer is up to depth + 1 batches ahead; the state is the consumer's
            assert prefetched.state_dict() == plain.state_dict(), n
        # and the producer does run ahead: it refills in the background, at its own pace (a
        # loaded machine may not have drawn the next batch yet, so wait for it)
        deadline = time.monotonic() + 60
        while prefetched.stream.state_dict() == plain.state_dict() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefetched.consumed == 12 and prefetched.stream.state_dict() != plain.state_dict()
    finally:
        prefetched.close()


def test_resuming_from_a_prefetchers_state_replays_the_prefetched_but_unconsumed_batches(make_cfg, tokenizer):
    interrupted = Prefetcher(stream(make_cfg, tokenizer), depth=4)
    for _ in range(7):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint holds it
    expected = [next(interrupted) for _ in range(9)]
    interrupted.close()
    resumed_stream = stream(make_cfg, tokenizer)
    resumed_stream.load_state_dict(state)
    resumed = Prefetcher(resumed_stream, depth=2)
    try:
        assert all(same(next(resumed), want) for want in expected)
    finally:
        resumed.close()


class Failing:
    """A stream whose third batch raises."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        if self.n == 3:
            raise KeyError("example 17 of task x is not in the cache")
        return {"input_ids": torch.full((2, 3), self.n)}

    def state_dict(self):
        return {"n": self.n}


def test_an_exception_in_the_producer_is_raised_in_the_consumer_at_its_batch():
    prefetched = Prefetcher(Failing(), depth=2)
    assert [int(next(prefetched)["input_ids"][0, 0]) for _ in range(2)] == [1, 2]
    assert prefetched.state_dict() == {"n": 2}
    with pytest.raises(KeyError, match="example 17 of task x is not in the cache"):
        next(prefetched)
    assert not prefetched._thread.is_alive()
    with pytest.raises(StopIteration):  # a failed prefetcher hands out nothing more
        next(prefetched)


class Counting:
    """An endless stream counting the batches drawn, optionally ending after ``last``."""

    def __init__(self, last=None):
        self.n, self.last = 0, last

    def __next__(self):
        if self.n == self.last:
            raise StopIteration
        self.n += 1
        return {"x": torch.tensor([self.n])}

    def state_dict(self):
        return {"n": self.n}


def test_close_stops_a_producer_blocked_on_a_full_hand_over_and_the_hand_over_is_bounded():
    source = Counting()
    prefetched = Prefetcher(source, depth=3)
    next(prefetched)
    for _ in range(100):  # let the producer fill the hand-over
        if len(prefetched._handoff.items) == 3:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)  # a producer that ignored the bound would go on
    assert len(prefetched._handoff.items) == 3
    assert source.n <= 1 + 3 + 1  # consumed + queued + the one waiting to be queued
    prefetched.close()
    assert not prefetched._thread.is_alive()
    prefetched.close()  # idempotent
    with pytest.raises(StopIteration):
        next(prefetched)


def test_a_finite_stream_ends_the_iteration_after_its_last_batch():
    assert [int(b["x"]) for b in Prefetcher(Counting(last=5), depth=2)] == [1, 2, 3, 4, 5]


def test_the_prefetch_depth_is_checked(make_cfg):
    with pytest.raises(ValueError, match="prefetch depth must be at least 1, got 0"):
        Prefetcher(Counting(), depth=0)
    with pytest.raises(ValueError, match="data.prefetch_batches must be >= 0, got -1"):
        make_cfg(prefetch_batches=-1)


def test_building_the_next_pool_ahead_changes_neither_the_batches_nor_the_position(make_cfg, tokenizer):
    plain, ahead = stream(make_cfg, tokenizer), stream(make_cfg, tokenizer)
    for n in range(23):  # pools of 5 batches
        if n % 3 == 0:
            ahead.build_next_pool()
        assert same(next(ahead), next(plain)) and ahead.state_dict() == plain.state_dict()
    state = ahead.state_dict()
    ahead.build_next_pool()
    resumed = stream(make_cfg, tokenizer)
    resumed.load_state_dict(state)
    assert same(next(resumed), next(ahead))


def test_a_pool_built_ahead_in_a_helper_thread_that_fails_surfaces_at_the_first_batch_of_that_pool(
        make_cfg, tokenizer, monkeypatch):
    source = stream(make_cfg, tokenizer)
    real = source._make_pool

    def failing(pool_index, *args):
        if pool_index == 1:
            raise MemoryError("pool 1 does not fit")
        return real(pool_index, *args)

    monkeypatch.setattr(source, "_make_pool", failing)
    prefetched = Prefetcher(source, depth=2)
    for _ in range(5):  # pool 0 (5 batches) is handed out whole
        next(prefetched)
    with pytest.raises(MemoryError, match="pool 1 does not fit"):
        next(prefetched)
    assert not prefetched._thread.is_alive() and prefetched.state_dict()["pool"] == 1


class Recorded:
    """Fixed micro-batches as a stream with a position."""

    def __init__(self, batches):
        self.batches, self.n = batches, 0

    def __next__(self):
        if self.n == len(self.batches):
            raise StopIteration
        self.n += 1
        return self.batches[self.n - 1]

    def state_dict(self):
        return {"n": self.n}


def test_the_trainer_step_counts_its_data_wait_and_checkpoints_the_consumers_position():
    from tests.conditioning.common import random_batch, tiny_model
    from tests.training.test_trainer_units import step_only_trainer

    from hp_deepspeed.training.trainer import WindowStats

    micro = [random_batch(3, seed=s, max_src=9, max_tgt=6) for s in range(6)]
    trainer = step_only_trainer(tiny_model("none"), "none", accumulation=2)
    trainer.step, trainer.batches = 1, Prefetcher(Recorded(micro), depth=3)
    window = WindowStats(num_tasks=4)
    try:
        trainer.train_step(trainer.batches, window)
        assert window.steps == 1 and window.data_wait_s > 0
        # two micro-batches consumed; the producer has drawn more, the checkpoint says 2
        assert trainer.trainer_state() == {"step": 1, "data": {"n": 2}}
    finally:
        trainer.batches.close()


def test_no_wake_up_is_lost_between_producer_and_consumer_at_any_depth(monkeypatch):
    """Each side sleeps on its lock only after finding the deque empty (consumer) or full
    (producer); a lost wake-up would cost a whole poll period, here made 20 s."""
    import random
    import time

    from hp_deepspeed.data import prefetch

    monkeypatch.setattr(prefetch, "_POLL_S", 20.0)
    rng = random.Random(0)

    class Jittery(Counting):
        def __next__(self):
            if rng.random() < 0.3:
                time.sleep(rng.random() * 1e-4)
            return super().__next__()

    for depth in (1, 2, 5):
        started = time.monotonic()
        prefetched = Prefetcher(Jittery(last=400), depth=depth)
        got = []
        for batch in prefetched:
            got.append(int(batch["x"]))
            if rng.random() < 0.3:
                time.sleep(rng.random() * 1e-4)
        assert got == list(range(1, 401))
        assert time.monotonic() - started < 10, depth
