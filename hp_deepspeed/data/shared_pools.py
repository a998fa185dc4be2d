"""Pools of the training stream built once per job and shared through files, not once per rank.

Why: a rank's slice of a global batch depends on the length of every draw of its pool (where a
batch is cut, and where in it, is a length rank over the whole pool), so a rank that builds its
pools itself does O(G) work per step, G = micro x ranks x accumulation: its cost grows with the
world size. Built once and shared, each rank only reads its own rows, O(micro) per step, and the
building rotates over the ranks: pool ``p`` is built by rank ``p % world_size``.

A pool file holds, for each global batch of the pool in consumption order, its G rows of
``(task index, example index)`` already in the batch's length order (what the stream's
``_Pool.batch(i)`` returns), and the pool's per-task counts. Its name carries a hash of
everything the pool is a function of (``pool_key``): the seed, the pool index, G, the pool size,
the batch mixing, the per-task offsets at the pool start, the tasks' names, sizes and mixing
rates, and a checksum of the examples' token lengths; so a file of another configuration is
never read, and a file with the same key is valid by construction and is reused (after a
requeue, for instance). Files are written under a temporary name, fsynced and renamed, so a
reader sees a whole file or none; a reader checks the header (magic, key, shape) and the size
before it maps the rows.

``PoolFiles`` owns one directory (the trainer uses ``<run.dir>/data_pools``): publishing,
waiting for and mapping files, and deleting the files this rank built once no rank can still
need them. ``directory_is_shared`` is the start-up check that every rank sees the same directory;
``share_pools`` is the decision taken from it. Not owned here: what a pool is (``data.stream``),
when pools are built (``data.stream`` and ``data.prefetch``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"HPPOOL01"
_HEADER = 64  # magic (8) + four int64 (pool batches, global batch, tasks, row itemsize) + key digest (24)
_DIGEST = 24
POOL_DIR = "data_pools"  # the trainer's pool directory, under run.dir
NAME_PREFIX = "pool-"
NAME_SUFFIX = ".rows"

WAIT_TIMEOUT_S = 900.0
"""How long a rank waits for a pool file built by another rank before it gives up. Generous: the
first pool is built when training starts, after the slowest rank has loaded its model."""


class PoolWaitError(RuntimeError):
    """A pool file did not appear in time (or the wait was stopped)."""


def pool_key(*, seed: int, pool_index: int, global_batch: int, pool_batches: int, batch_mixing: str,
             offsets: Sequence[int], tasks: Sequence[str], sizes: Sequence[int], rates: Sequence[float],
             lengths_checksum: int) -> str:
    """The hex digest naming a pool: a hash of everything its rows are a function of."""
    described = json.dumps({
        "format": FORMAT, "seed": int(seed), "pool": int(pool_index), "global_batch": int(global_batch),
        "pool_batches": int(pool_batches), "mixing": batch_mixing, "offsets": [int(o) for o in offsets],
        "tasks": list(tasks), "sizes": [int(s) for s in sizes], "rates": [float(r).hex() for r in rates],
        "lengths": int(lengths_checksum),
    }, sort_keys=True)
    return hashlib.blake2b(described.encode(), digest_size=_DIGEST).hexdigest()


def share_pools(setting: str, world_size: int, directory_shared: bool | None) -> bool:
    """Whether ranks share pool files: ``data.share_pools`` is ``auto``, more than one rank, and
    every rank sees the same directory (``directory_shared``; None when it was not checked)."""
    if setting not in ("auto", "off"):
        raise ValueError(f"data.share_pools must be 'auto' or 'off', got {setting!r}")
    return setting == "auto" and world_size > 1 and bool(directory_shared)


def directory_is_shared(directory: Path, rank: int, broadcast, agree) -> bool:
    """Whether every rank sees the same ``directory``: rank 0 writes a file under a random name,
    every rank looks for it, and the answers are agreed (``broadcast(obj)``: rank 0's object on
    every rank; ``agree(flag)``: the minimum over ranks). A rank that cannot create or read the
    directory answers no. Collective: every rank calls it."""
    token = None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            token = f".shared-check-{uuid.uuid4().hex}"
            (directory / token).write_text(token)
        except OSError as err:
            logger.warning("data pools: cannot write %s (%s)", directory, err)
            token = None
    token = broadcast(token)
    seen = False
    if token is not None:
        try:
            seen = (directory / token).read_text() == token
        except OSError:
            seen = False
    shared = bool(agree(seen))
    if rank == 0 and token is not None:
        (directory / token).unlink(missing_ok=True)
    return shared


class PoolFiles:
    """The pool files of one job in ``directory``, seen from rank ``rank`` of ``world_size``.

    ``keep_pools``: a rank deletes the files it built of pools more than this many before the one
    it takes next (the stream sizes it to cover how far ranks can be apart, prefetching included).
    ``stop`` (an Event), when set, ends a wait with ``PoolWaitError``."""

    def __init__(self, directory: Path | str, rank: int, world_size: int, keep_pools: int,
                 timeout_s: float = WAIT_TIMEOUT_S):
        if keep_pools < 1:
            raise ValueError(f"keep_pools must be at least 1, got {keep_pools}")
        self.directory = Path(directory)
        self.rank, self.world_size = rank, world_size
        self.keep_pools = keep_pools
        self.timeout_s = timeout_s
        self.stop = threading.Event()
        self.built: dict[int, Path] = {}  # pool index -> file this rank published or reused

    def builder_of(self, pool_index: int) -> int:
        return pool_index % self.world_size

    def path(self, pool_index: int, key: str) -> Path:
        return self.directory / f"{NAME_PREFIX}{pool_index:08d}-{key}{NAME_SUFFIX}"

    # ------------------------------------------------------------------ writing (the builder)
    def publish(self, pool_index: int, key: str, rows: np.ndarray, counts: Sequence[int]) -> Path:
        """Write ``rows`` [pool batches, G, 2] and ``counts`` as pool ``pool_index``'s file,
        atomically (a temporary name, then a rename); returns its path."""
        pool_batches, global_batch, two = rows.shape
        if two != 2:
            raise ValueError(f"pool rows must be [batches, G, 2], got {rows.shape}")
        header = MAGIC + np.array([pool_batches, global_batch, len(counts), rows.dtype.itemsize],
                                  dtype="<i8").tobytes() + bytes.fromhex(key)
        final = self.path(pool_index, key)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(temporary, "wb") as out:
                out.write(header)
                out.write(np.asarray(counts, dtype="<i8").tobytes())
                out.write(np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).tobytes())
                # On disk before the name: after a power loss a file under the final name could
                # otherwise hold zeros that pass every check a reader can afford.
                os.fsync(out.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self.built[pool_index] = final
        return final

    def adopt(self, pool_index: int, path: Path) -> None:
        """Count a valid file found in place (reused) as this rank's, for its later deletion."""
        self.built[pool_index] = path

    def forget_old(self, taking: int) -> None:
        """Delete this rank's files of pools before ``taking - keep_pools`` (``taking``: the pool
        this rank is about to take): by then every rank has mapped them (a mapping outlives the
        file's name)."""
        for index in [i for i in self.built if i < taking - self.keep_pools]:
            self.built.pop(index).unlink(missing_ok=True)

    def remove_built(self) -> None:
        """Delete every file this rank built or reused (at a clean exit), and the directory
        once it is empty (the last rank to get here removes it)."""
        for path in self.built.values():
            path.unlink(missing_ok=True)
        self.built.clear()
        try:
            self.directory.rmdir()
        except OSError:
            pass  # other ranks' files are still there, or it is gone already

    # ------------------------------------------------------------------ reading
    def load(self, pool_index: int, key: str, tasks: int) -> tuple[list[int], np.ndarray] | None:
        """The counts and the mapped rows [pool batches, G, 2] of a valid file of this key, or
        None if there is none (or only a file that does not match: a torn copy, another key)."""
        path = self.path(pool_index, key)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER)
                if len(head) < _HEADER or head[:8] != MAGIC or head[40:] != bytes.fromhex(key):
                    return None
                pool_batches, global_batch, num_tasks, itemsize = np.frombuffer(head[8:40], dtype="<i8").tolist()
                if num_tasks != tasks or itemsize not in (4, 8):
                    return None
                counts = np.frombuffer(f.read(8 * num_tasks), dtype="<i8").tolist()
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return None
        offset = _HEADER + 8 * num_tasks
        shape = (pool_batches, global_batch, 2)
        if size != offset + itemsize * int(np.prod(shape)) or len(counts) != num_tasks:
            return None
        rows = np.memmap(path, dtype=f"<i{itemsize}", mode="r", offset=offset, shape=shape)
        return counts, rows

    def wait(self, pool_index: int, key: str, tasks: int) -> tuple[list[int], np.ndarray]:
        """``load``, polling with backoff until the builder's file appears; after ``timeout_s``
        one line naming the file, the builder rank and what to check."""
        started = time.monotonic()
        pause = 0.001
        while True:
            found = self.load(pool_index, key, tasks)
            if found is not None:
                return found
            waited = time.monotonic() - started
            if self.stop.is_set():
                raise PoolWaitError(f"stopped waiting for data pool file {self.path(pool_index, key)}")
            if waited > self.timeout_s:
                raise PoolWaitError(
                    f"data pool {pool_index} did not appear in {self.timeout_s:.0f}s: rank "
                    f"{self.builder_of(pool_index)} builds {self.path(pool_index, key)}; check that rank's log "
                    f"for an error, that {self.directory} is the same directory on every node, or set "
                    f"data.share_pools: off"
                )
            self.stop.wait(min(pause, max(0.0, self.timeout_s - waited) + 0.001))
            pause = min(pause * 2, 0.05)
