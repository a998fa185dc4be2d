"""The stream in real ranks (separate processes, gloo): ranks agree on one global stream,
take disjoint shares of it, and a checkpointed position is continued by another world size."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from hp_deepspeed.data import DataConfig, TrainStream, build_tasks, load_tokenizer
from hp_deepspeed.testing.ranks import run_ranks

TASKS = ["synthetic/copy", "synthetic/sort", "glue/rte"]


def rank_body(cache_dir: str, steps: int, state: dict | None, pool_dir: str | None = None) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(tasks=TASKS, cache_dir=cache_dir, bucket_pool_batches=8)
    stream = TrainStream(cfg, build_tasks(cfg), load_tokenizer(None), 8 // world, rank, world, pool_dir=pool_dir)
    if state is not None:
        stream.load_state_dict(state)
    seen = []
    for _ in range(steps):
        batch = next(stream)
        seen += [
            (int(t), tuple(ids[mask.bool()].tolist()))
            for t, ids, mask in zip(batch["task_ids"], batch["input_ids"], batch["attention_mask"])
        ]
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    built = sorted(stream.pool_files.built) if stream.pool_files is not None else None
    return {"pid": os.getpid(), "seen": gathered, "state": stream.state_dict(), "built": built}


@pytest.mark.distributed
def test_real_ranks_take_contiguous_shares_of_one_global_stream(tmp_path):
    cache = str(tmp_path / "cache")
    # One rank with the same global batch (8 x 1) gives the global stream; it also fills the
    # tokenisation cache, so the ranks below do not tokenise. Unpacked, as the ranks' streams are.
    cfg = DataConfig(tasks=TASKS, cache_dir=cache, bucket_pool_batches=8, packing=False)
    single = TrainStream(cfg, build_tasks(cfg), load_tokenizer(None), 8, 0, 1)
    global_rows = [
        (int(t), tuple(ids[mask.bool()].tolist()))
        for batch in (next(single) for _ in range(12))
        for t, ids, mask in zip(batch["task_ids"], batch["input_ids"], batch["attention_mask"])
    ]
    # The ranks share their pools through files (data/shared_pools.py): each builds its own.
    pools = tmp_path / "pools"
    two = run_ranks("tests.data.test_distributed:rank_body", 2, timeout=180, args=(cache, 12, None, str(pools)))
    assert [two[0]["built"], two[1]["built"]] == [[0], [1]] and len(list(pools.iterdir())) == 2
    assert two[0]["seen"] == two[1]["seen"] and two[0]["pid"] != two[1]["pid"]
    rank0, rank1 = two[0]["seen"]
    assert len(rank0) == len(rank1) == 48 and not set(rank0) & set(rank1)
    for step in range(12):
        global_batch = global_rows[8 * step : 8 * step + 8]
        assert global_batch[:4] == rank0[4 * step : 4 * step + 4]  # rank r: the r-th contiguous slice
        assert global_batch[4:] == rank1[4 * step : 4 * step + 4]
    # every rank holds the position the single rank reached after the same 12 global batches
    assert two[0]["state"] == two[1]["state"] == single.state_dict()
