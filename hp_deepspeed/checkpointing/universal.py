"""DeepSpeed universal checkpoints: resume a ZeRO-3 run on a different number of ranks.

A native ZeRO-3 checkpoint stores each rank's flat partition of the fp32 master weights and Adam
moments, so it only loads on the same data-parallel world size. ``ds_to_universal`` rewrites it
as one folder per parameter (``universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``) that any
world size can re-partition; the module/lr-scheduler/client state file of rank 0 is copied along.

The conversion runs as a child process (``python -m deepspeed.checkpoint.ds_to_universal``): it
needs every optimizer shard in host memory and its own worker pools, which should not live inside
a training rank that holds a process group. Output goes to ``step-N/universal.staging`` and is
renamed to ``step-N/universal`` with its own ``COMPLETE`` marker, so a crashed conversion is
redone, never half-used, and a finished one is reused by every later resume. The tool's own
output is read as it comes and turned into a few progress lines (each phase, and its count of
shards or parameters every quarter), since a large model's conversion takes minutes.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from hp_deepspeed.checkpointing.layout import (
    MARKER,
    STAGING_SUFFIX,
    UNIVERSAL,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    fsync_path,
    is_complete,
    read_marker,
)
from hp_deepspeed.compat.deepspeed import parse_universal_output
from hp_deepspeed.launching import collectives

log = logging.getLogger(__name__)

FAILED = UNIVERSAL + ".FAILED"
POLL_SECONDS = 2.0
# A phase's count is reported when it passes each quarter, and at least this often while it moves.
PROGRESS_SECONDS = 30.0
# What each phase of the tool counts, by the first word of its title.
UNITS = {"extracting": "shards", "merging": "parameters"}


class ConversionProgress:
    """Turns ``ds_to_universal``'s output into progress lines for ``report``: one per phase, then
    "n/N parameters" when a quarter is passed (or ``PROGRESS_SECONDS`` went by), never per item."""

    def __init__(self, report: Callable[[str], None]):
        self.report = report
        self.unit = "items"
        self.reported = self.last_done = -1
        self.reported_at = time.monotonic()

    def feed(self, piece: str) -> None:
        event = parse_universal_output(piece)
        if event is None:
            return
        if event[0] == "phase":
            _, number, title = event
            self.unit = UNITS.get(title.split()[0].lower(), "items")
            self.reported = self.last_done = -1
            self._say(f"{number}. {title[0].lower()}{title[1:]}")
            return
        _, done, total = event
        if done == self.last_done or total == 0:
            return
        self.last_done = done
        quarter = 4 * done // total
        if quarter > self.reported or time.monotonic() - self.reported_at >= PROGRESS_SECONDS:
            self.reported = quarter
            self._say(f"   {done}/{total} {self.unit}")

    def _say(self, line: str) -> None:
        self.reported_at = time.monotonic()
        self.report(line)


def _run_reporting(cmd: list[str], report: Callable[[str], None] | None) -> tuple[int, str]:
    """Run the converter, feeding its output to a :class:`ConversionProgress` as it arrives;
    returns the exit code and the whole output."""
    progress = ConversionProgress(report) if report is not None else None
    # Unbuffered: its phase lines must arrive when printed, not when the pipe's buffer fills.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a bar's blocks are multi-byte
    chunks, pending = [], ""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        text = decoder.decode(chunk)
        chunks.append(text)
        if progress is not None:
            *pieces, pending = re.split(r"[\r\n]", pending + text)
            for piece in pieces:
                progress.feed(piece)
    if progress is not None and pending:
        progress.feed(pending)
    proc.stdout.close()
    return proc.wait(), "".join(chunks)


def universal_dir(step_dir: str | Path) -> Path:
    return Path(step_dir) / UNIVERSAL


def is_converted(step_dir: str | Path) -> bool:
    return is_complete(universal_dir(step_dir))


def convert_to_universal(checkpoint_dir: str | Path, workers: int | None = None, overwrite: bool = True,
                         report: Callable[[str], None] | None = None) -> Path:
    """Convert one complete ``step-N`` folder in place; returns ``step-N/universal``.

    Single process, no process group: this is what ``hp-deepspeed convert-universal`` calls, and
    what rank 0 calls during an automatic resume. A folder already converted is returned as is.
    ``overwrite=False`` (the command line without ``--overwrite``) refuses to replace a non-empty
    ``universal`` folder that has no marker instead of deleting it. ``report`` receives the
    progress lines (:class:`ConversionProgress`).
    """
    step_dir = Path(checkpoint_dir).resolve()
    marker = read_marker(step_dir)
    if marker is None:
        raise CheckpointError(f"{step_dir}: no {MARKER} marker, not a complete checkpoint; refusing to convert it")
    out = universal_dir(step_dir)
    if is_converted(step_dir):
        return out
    staging = step_dir / (UNIVERSAL + STAGING_SUFFIX)
    if not overwrite:
        from hp_deepspeed.output_folder import check_target

        check_target(out, overwrite, "convert-universal: output folder")
    try:  # a read-only checkpoint fails here, naming the folder, not after the tool's traceback
        tempfile.TemporaryFile(dir=step_dir).close()
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(step_dir)) from None
    for stale in (staging, out):  # out without a marker: a crash between rename and marker
        if stale.exists():
            shutil.rmtree(stale)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(step_dir), "--output_folder", str(staging),
        "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
    ]
    started = time.time()
    returncode, output = _run_reporting(cmd, report)
    # The tool points a "latest_universal" file in the parent of its output folder at the staging
    # name; we always load by explicit tag, so a pointer to a folder that is about to move only misleads.
    (step_dir / "latest_universal").unlink(missing_ok=True)
    if returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{step_dir}: ds_to_universal failed with exit code {returncode}:\n{output[-4000:]}")
    os.replace(staging, out)
    fsync_path(step_dir)
    atomic_write_json(out / MARKER, {
        "source_world_size": marker.get("world_size"),
        "seconds": round(time.time() - started, 1),
        "time": time.time(),
    })
    return out


def ensure_universal(step_dir: str | Path, timeout_s: float) -> Path:
    """Collective: rank 0 converts (unless already done), the other ranks wait for it.

    The others poll the file system instead of sitting in a barrier, because a multi-billion
    parameter conversion can outlast the process group's collective timeout. A failure on rank 0 is
    published as ``universal.FAILED`` so every rank raises the same error instead of timing out.
    """
    step_dir = Path(step_dir)
    failed = step_dir / FAILED
    rank = collectives.rank()
    if rank == 0:
        failed.unlink(missing_ok=True)
    collectives.barrier()  # nobody reads a stale FAILED left by an earlier attempt
    if rank == 0:
        try:
            out = convert_to_universal(step_dir, report=lambda line: log.info("universal conversion: %s", line))
        except BaseException as err:
            atomic_write_text(failed, f"{type(err).__name__}: {err}")
            raise
    else:
        deadline = time.monotonic() + timeout_s
        while not is_converted(step_dir):
            if failed.is_file():
                raise CheckpointError(f"{step_dir}: universal conversion failed on rank 0: {failed.read_text()}")
            if time.monotonic() > deadline:
                raise CheckpointError(f"{step_dir}: rank 0's universal conversion did not finish in {timeout_s:.0f}s")
            time.sleep(POLL_SECONDS)
        out = universal_dir(step_dir)
    collectives.barrier()
    return out
