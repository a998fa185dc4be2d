"""One trainer per run dir, and a run dir every rank can write, checked before the model is built.

``claim_run_dir(run_dir, rank)`` runs on every rank right after the process group is up:

1. Rank 0 creates the run dir, checks it can write there, and takes an exclusive ``flock`` on
   ``RUN_DIR/trainer.lock``, writing its host, pid and start time into the file. The lock is
   held until the process exits: the kernel drops it when the process dies however it dies, so a
   SIGKILLed or OOM-killed run never blocks its own resume, and no stale-lock cleanup exists.
2. The outcome is broadcast; then every other rank checks that it can write to the run dir
   (another node may mount it read-only) and the ranks gather their results.

A refusal is one ``RunDirError`` line from rank 0 (naming the holder's host and pid, or the
path and the OS error in words); the other ranks exit with the same code silently, so a
2-rank launch prints the line once and nobody waits on a collective.

On network file systems ``flock`` is what NFSv4 and Lustre (mounted with ``-o flock``) honour
across nodes; on a file system without it the lock is per node only.

It does not own what the trainer writes into the run dir.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from hp_deepspeed.config import ConfigError
from hp_deepspeed.io_errors import describe_os_error
from hp_deepspeed.launching import collectives

LOCK_NAME = "trainer.lock"


class RunDirError(ConfigError):
    """The run dir cannot be used by this trainer (in use, read-only, forbidden)."""


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/trainer.lock``, held by this process until ``release``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"run.dir={self.path.parent} is in use by another trainer (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, since {holder.get('started', '?')}; lock {self.path}); wait for "
                f"it to end or choose another run.dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):  # the holder is between truncate and write: its pid is unknown
        return {}


def check_writable(run_dir: Path) -> None:
    """Create and remove a file in ``run_dir``; an OSError becomes one line naming the path."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise RunDirError(f"run.dir={run_dir} is not writable: {describe_os_error(err, run_dir)}") from None


def claim_run_dir(run_dir: Path, rank: int) -> RunLock | None:
    """Every rank calls this once; rank 0 returns the held lock, the others ``None``."""
    lock, error = None, None
    if rank == 0:
        try:
            check_writable(run_dir)
            lock = RunLock(run_dir)
            lock.acquire()
        except RunDirError as err:
            error = str(err)
        except OSError as err:
            error = f"run.dir={run_dir}: {describe_os_error(err, run_dir)}"
    error = collectives.broadcast_object(error)
    if error is None:  # rank 0 holds the lock; can every other rank write there too?
        mine = None
        if rank != 0:
            try:
                check_writable(run_dir)
            except RunDirError as err:
                mine = f"rank {rank} on {socket.gethostname()}: {err}"
        error = next((e for e in collectives.all_gather_objects(mine) if e), None)
    if error is None:
        return lock
    if lock is not None:
        lock.release()
    if rank == 0:
        raise RunDirError(error)
    raise SystemExit(2)  # rank 0 prints the one line; every rank exits as bad input does
