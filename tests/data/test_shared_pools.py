"""Pools built once per job and shared through files (data/shared_pools.py): simulated ranks in
one process over one directory get bit for bit the micro-batches of the unshared path, each rank
builds only its own pools, and waiting, the start-up decision and the cleanup behave."""

from __future__ import annotations

import numpy as np
import pytest

from hp_deepspeed.data import TrainStream, build_tasks
from hp_deepspeed.data.prefetch import Prefetcher
from hp_deepspeed.data.shared_pools import (NAME_PREFIX, PoolFiles, PoolWaitError, directory_is_shared,
                                            share_pools)

TASKS = ["synthetic/copy", "synthetic/reverse", "glue/rte", "superglue/cb"]


def make_streams(make_cfg, tokenizer, world_size, pool_dir, micro=3, accumulation=1, **cfg):
    config = make_cfg(tasks=TASKS, **cfg)
    tasks = build_tasks(config)
    return [TrainStream(config, tasks, tokenizer, micro, r, world_size, accumulation=accumulation, pool_dir=pool_dir)
            for r in range(world_size)]


def count_builds(streams):
    built = {id(s): [] for s in streams}
    for s in streams:
        real = s._make_pool

        def counting(pool_index, *args, _real=real, _s=s):
            built[id(_s)].append(pool_index)
            return _real(pool_index, *args)

        s._make_pool = counting
    return built


def shares_in_lockstep(streams, steps, accumulation):
    """Every rank's rows of every micro-step, ranks in builder-friendly order: at each micro-step
    the builder of the pool about to be needed goes first, so no rank waits on a later one."""
    out = [[] for _ in streams]
    world = len(streams)
    for _ in range(steps * accumulation):
        builder = streams[0]._pool_index % world  # the ranks are at the same position
        for r in [builder] + [r for r in range(world) if r != builder]:
            out[r].append(streams[r].next_share())
    return out


@pytest.mark.parametrize("mixing", ["stratified", "length"])
@pytest.mark.parametrize("world_size,accumulation,pool_batches", [(2, 1, 7), (3, 2, 7), (8, 1, 200), (5, 3, 200)])
def test_ranks_sharing_pool_files_get_the_micro_batches_of_the_unshared_path_bit_for_bit(
        make_cfg, tokenizer, tmp_path, mixing, world_size, accumulation, pool_batches):
    steps = 2 * pool_batches + 1  # two pool boundaries
    common = dict(bucket_pool_batches=pool_batches, batch_mixing=mixing)
    shared = make_streams(make_cfg, tokenizer, world_size, tmp_path / "pools", accumulation=accumulation, **common)
    alone = make_streams(make_cfg, tokenizer, world_size, None, accumulation=accumulation, **common)
    built = count_builds(shared)
    got = shares_in_lockstep(shared, steps, accumulation)
    want = shares_in_lockstep(alone, steps, accumulation)
    for r in range(world_size):
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got[r], want[r])), f"rank {r}"
        assert shared[r].state_dict() == alone[r].state_dict()
    # each rank built exactly its own pools: p % world_size == rank
    pools = shared[0]._pool_index + 1
    for r, s in enumerate(shared):
        assert built[id(s)] == [p for p in range(pools) if p % world_size == r]


def test_prefetching_ranks_sharing_pools_of_one_batch_get_the_unshared_batches_while_old_files_go(
        make_cfg, tokenizer, tmp_path):
    # Pools of one batch: a boundary every step, the pool threads of both ranks waiting on each
    # other's files, and the builders deleting their old files as they go.
    pools = tmp_path / "pools"
    shared = make_streams(make_cfg, tokenizer, 2, pools, micro=4, bucket_pool_batches=1, prefetch_batches=2)
    alone = make_streams(make_cfg, tokenizer, 2, None, micro=4, bucket_pool_batches=1, prefetch_batches=2)
    keep = shared[0].pool_files.keep_pools
    steps = 2 * keep + 10
    prefetched = [Prefetcher(s, depth=2) for s in shared]
    try:
        for _ in range(steps):
            for r in range(2):
                got, want = next(prefetched[r]), next(alone[r])
                assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    finally:
        for p in prefetched:
            p.close()
    assert [p.state_dict() for p in prefetched] == [s.state_dict() for s in alone]
    on_disk = sorted(int(p.name[len(NAME_PREFIX):][:8]) for p in pools.glob(f"{NAME_PREFIX}*"))
    # the pools of the last keep + a few steps are left; the older ones were deleted by their builders
    assert on_disk and on_disk[0] >= steps - keep - 4 and len(on_disk) <= keep + 8
    for s in shared:
        s.remove_pool_files()
    assert not pools.exists()


def test_old_pool_files_go_although_a_rank_builds_only_one_pool_in_world_size(make_cfg, tokenizer, tmp_path):
    pools = tmp_path / "pools"
    streams = make_streams(make_cfg, tokenizer, 8, pools, micro=2, bucket_pool_batches=7, prefetch_batches=0)
    keep = streams[0].pool_files.keep_pools
    assert keep < 8
    shares_in_lockstep(streams, 7 * 20, 1)  # pools 0-19 taken
    on_disk = sorted(int(p.name[len(NAME_PREFIX):][:8]) for p in pools.glob(f"{NAME_PREFIX}*"))
    assert on_disk == list(range(19 - keep, 20)), (on_disk, keep)  # taking 19 deleted those before 19 - keep


def test_a_pool_files_rows_are_the_batches_length_orders(make_cfg, tokenizer):
    (s,) = make_streams(make_cfg, tokenizer, 1, None, micro=5, bucket_pool_batches=9)
    pool = s._make_pool(3, [11, 2, 40, 7], 40, 9)
    rows = pool.all_batches()
    assert rows.shape == (9, 40, 2) and rows.dtype == np.int32
    assert all(np.array_equal(rows[i], pool.batch(i)) for i in range(9))


def test_a_resumed_stream_reuses_the_pool_files_or_builds_them_and_a_new_world_size_gets_new_files(
        make_cfg, tokenizer, tmp_path):
    pools = tmp_path / "pools"
    first = make_streams(make_cfg, tokenizer, 2, pools, micro=4, bucket_pool_batches=5)
    got = shares_in_lockstep(first, 7, 1)
    state = first[0].state_dict()
    files = sorted(p.name for p in pools.glob(f"{NAME_PREFIX}*"))
    assert len(files) == 2  # pools 0 and 1
    # A requeue: the same key, so the same files are mapped again and nothing is rebuilt.
    again = make_streams(make_cfg, tokenizer, 2, pools, micro=4, bucket_pool_batches=5)
    built = count_builds(again)
    for s in again:
        s.load_state_dict(state)
    alone = make_streams(make_cfg, tokenizer, 2, None, micro=4, bucket_pool_batches=5)
    want = shares_in_lockstep(alone, 12, 1)
    resumed = shares_in_lockstep(again, 5, 1)
    assert all(np.array_equal(a, b) for r in range(2) for a, b in zip(got[r] + resumed[r], want[r]))
    assert built[id(again[0])] == [2] and built[id(again[1])] == []  # pool 1's file was reused
    # Another world size with another global batch (12): the next pool, other keys, new files.
    four = make_streams(make_cfg, tokenizer, 4, pools, micro=3, bucket_pool_batches=5)
    for s in four:
        s.load_state_dict(state)
    alone4 = make_streams(make_cfg, tokenizer, 4, None, micro=3, bucket_pool_batches=5)
    for s in alone4:
        s.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(sum(shares_in_lockstep(four, 6, 1), []),
                                                    sum(shares_in_lockstep(alone4, 6, 1), [])))
    assert len(list(pools.glob(f"{NAME_PREFIX}*"))) > len(files)


def test_a_rank_waiting_for_a_pool_nobody_builds_says_which_file_and_rank(make_cfg, tokenizer, tmp_path):
    streams = make_streams(make_cfg, tokenizer, 2, tmp_path / "pools", bucket_pool_batches=5)
    streams[1].pool_files.timeout_s = 0.05
    with pytest.raises(PoolWaitError, match=r"data pool 0 did not appear in 0s: rank 0 builds .*pools/pool-00000000-"
                                            r"[0-9a-f]{48}\.rows; check that rank's log .*data.share_pools: off"):
        next(streams[1])


def test_closing_a_prefetcher_stops_its_wait_for_a_pool_file(make_cfg, tokenizer, tmp_path):
    streams = make_streams(make_cfg, tokenizer, 2, tmp_path / "pools", bucket_pool_batches=5)
    prefetched = Prefetcher(streams[1], depth=2)  # rank 1 waits for rank 0's pool 0, which never comes
    prefetched.close()  # returns at once, not after the wait's timeout
    assert not prefetched._thread.is_alive() and not streams[1].pool_files.stop.is_set()


def test_a_torn_or_foreign_file_under_the_pool_name_is_never_read(tmp_path):
    files = PoolFiles(tmp_path, rank=0, world_size=2, keep_pools=3)
    key = "ab" * 24
    rows = np.arange(2 * 6 * 2, dtype=np.int32).reshape(2, 6, 2)
    path = files.publish(4, key, rows, [5, 7])
    counts, mapped = files.load(4, key, tasks=2)
    assert counts == [5, 7] and np.array_equal(mapped, rows)
    assert files.load(4, "cd" * 24, tasks=2) is None and files.load(4, key, tasks=3) is None
    path.write_bytes(path.read_bytes()[:-4])  # torn
    assert files.load(4, key, tasks=2) is None
    assert not list(tmp_path.glob(".*tmp"))


def test_a_builder_deletes_its_old_pool_files_and_at_exit_the_rest(tmp_path):
    pools = tmp_path / "pools"
    files = PoolFiles(pools, rank=1, world_size=2, keep_pools=3)
    rows = np.zeros((1, 4, 2), dtype=np.int32)
    for pool in range(1, 8):
        files.forget_old(pool)
        if files.builder_of(pool) == 1:
            files.publish(pool, f"{pool:02x}" * 24, rows, [4])
    # taking pool 7 with 3 pools kept: pools before 4 are nobody's any more
    assert sorted(files.built) == [5, 7]
    assert sorted(int(p.name[len(NAME_PREFIX):][:8]) for p in pools.glob(f"{NAME_PREFIX}*")) == [5, 7]
    (pools / "pool-00000006-of-rank-0.rows").write_bytes(b"")  # another rank's file
    files.remove_built()
    assert [p.name for p in pools.iterdir()] == ["pool-00000006-of-rank-0.rows"]
    files.publish(9, "09" * 24, rows, [4])
    (pools / "pool-00000006-of-rank-0.rows").unlink()
    files.remove_built()  # the last rank to leave removes the directory
    assert not pools.exists()


def test_streams_keep_enough_pools_for_small_pools_and_deep_prefetching(make_cfg, tokenizer, tmp_path):
    one = make_streams(make_cfg, tokenizer, 2, tmp_path, bucket_pool_batches=1, prefetch_batches=4)[0]
    seven = make_streams(make_cfg, tokenizer, 2, tmp_path, bucket_pool_batches=7, prefetch_batches=4)[0]
    deep = make_streams(make_cfg, tokenizer, 2, tmp_path, bucket_pool_batches=7, prefetch_batches=64)[0]
    big = make_streams(make_cfg, tokenizer, 2, tmp_path, bucket_pool_batches=200, prefetch_batches=4)[0]
    # pools of one batch: more pools than the micro-steps a producer runs ahead plus slack
    assert one.pool_files.keep_pools > 4 + 1 + 2
    assert seven.pool_files.keep_pools * 7 > 4 + 1 + 2 and deep.pool_files.keep_pools * 7 > 64 + 1 + 2
    assert big.pool_files.keep_pools >= 3


def test_pools_are_shared_only_with_several_ranks_on_one_directory_unless_turned_off():
    assert share_pools("auto", 8, True)
    assert not share_pools("auto", 1, True)
    assert not share_pools("auto", 8, False)
    assert not share_pools("off", 8, True)
    with pytest.raises(ValueError, match="data.share_pools must be 'auto' or 'off', got 'yes'"):
        share_pools("yes", 8, True)


def test_the_shared_directory_check_finds_a_directory_other_ranks_do_not_see(tmp_path):
    same, elsewhere = tmp_path / "same", tmp_path / "elsewhere"
    elsewhere.mkdir()
    token = {}

    def broadcast_from_rank0(obj):
        token["name"] = obj
        return obj

    def rank1_looks_in(directory):  # the minimum over rank 0's answer and rank 1's
        return lambda flag: int(flag and (directory / token["name"]).is_file())

    assert directory_is_shared(same, 0, broadcast_from_rank0, rank1_looks_in(same))
    assert not list(same.iterdir())  # rank 0 removed its token
    assert not directory_is_shared(same, 0, broadcast_from_rank0, rank1_looks_in(elsewhere))
    # seen from rank 1: rank 0's token is not in rank 1's directory, or rank 0 could not write one
    assert not directory_is_shared(elsewhere, 1, lambda obj: ".shared-check-0123", lambda flag: flag)
    assert not directory_is_shared(elsewhere, 1, lambda obj: None, lambda flag: flag)
