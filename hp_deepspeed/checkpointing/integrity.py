"""Checkpoint files written durably, recorded, and verified before a resume trusts them.

Owns three things:

* ``SaveLedger``: the write path of every file one rank contributes to a save. DeepSpeed's shards
  reach it through ``compat.checkpoint.route_checkpoint_writes``; the manager's own JSON, YAML and
  RNG files through ``write_text`` / ``adopt``. Each file is fsynced and its size and xxh3-128
  digest recorded as the bytes go out (no second read). A failed write is *recorded*, never
  raised: DeepSpeed's save holds barriers, and a rank raising inside it would leave the others
  waiting there until the collective timeout. The failure travels to every rank at the save's
  agreement point instead, worded with its path (``describe_os_error``).
* the manifest (``manifest.json``), which rank 0 assembles from every rank's ledger, completes
  with whatever else lies in the staging folder, and writes, fsynced with every directory,
  before ``COMPLETE``.
* ``verify``: a step folder checked against its manifest (sizes, then digests), the share of the
  files one rank checks, so that a resume reads the checkpoint once in parallel over the ranks;
  where the rank loads what it checks, the files are read into memory in the same pass
  (``preload``) and the load uses that verified copy.

Does not own the folder layout or the commit order (``layout``, ``manager``).

Why xxh3-128: it hashes at several GB/s per core (against ~2 GB/s for zlib's CRC32 and
~1 GB/s for SHA-1 on the same machine), so recording it while writing costs little next to the
disk, and it covers torch's own per-record CRC32, which the writer therefore turns off.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import xxhash

from hp_deepspeed.checkpointing.layout import fsync_path
from hp_deepspeed.checkpointing.preload import read_held, record_spans
from hp_deepspeed.compat.checkpoint import torch_save_without_crc32

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_128"
READ_CHUNK = 16 << 20
# Folders a step gains after its commit (a universal conversion) are not part of its manifest.
NOT_IN_MANIFEST = ("universal", "universal.staging", "universal.FAILED", "latest_universal")


def describe_os_error(err: BaseException, path: str | Path | None = None) -> str:
    """``err`` in words with the path it concerns: ``/x/y.pt: no space left on device``."""
    if isinstance(err, OSError) and err.errno is not None:
        words = os.strerror(err.errno)
        words = words[:1].lower() + words[1:]
        where = err.filename or path
        return f"{where}: {words}" if where else words
    what = f"{type(err).__name__}: {err}".splitlines()[0]
    return f"{path}: {what}" if path else what


def digest_file(path: str | Path) -> tuple[int, str]:
    """Size and xxh3-128 hex digest of a file, hashed straight from a read-only memory map.

    Mapped with sequential read-ahead, the hash runs while the kernel reads the next pages, and
    no user-space copy is made, so verifying keeps up with ``dd`` cold and from the page cache,
    where a ``readinto`` loop into a buffer fell behind in both. The pages it leaves in the page
    cache are those the resume's memory-mapped load copies from next.
    """
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        hasher = xxhash.xxh3_128()
        if size == 0:
            return 0, hasher.hexdigest()
        try:
            mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap (some FUSE mounts)
            return _digest_by_reads(fh, hasher)
        try:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                for start in range(0, size, READ_CHUNK):
                    hasher.update(view[start:start + READ_CHUNK])
            finally:
                view.release()
        finally:
            mapped.close()
    return size, hasher.hexdigest()


def _digest_by_reads(fh, hasher) -> tuple[int, str]:
    size = 0
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    while True:
        n = fh.readinto(buffer)
        if not n:
            break
        hasher.update(view[:n])
        size += n
    return size, hasher.hexdigest()


class _HashingFile:
    """The file object ``torch.save`` writes into: every byte goes to the disk and to the digest.

    torch's zip writer streams sequentially to a file-like object, so the digest of what passed
    through is the digest of the file. An OSError is kept: torch re-raises it as an opaque
    ``enforce fail at inline_container.cc`` RuntimeError, which names neither errno nor path.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hasher = xxhash.xxh3_128()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as err:
            self.error = err
            raise
        self.hasher.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class WriteFailure:
    """A write that failed on one rank (picklable: it travels to every rank)."""

    rank: int
    path: str
    cause: str
    """The OS error in words (``no space left on device``), or the exception's first line."""


@dataclass
class RankReport:
    """What one rank contributes at the save's agreement point."""

    rank: int
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Path relative to the staging folder -> {"size", "digest", "rank"}."""
    failures: list[WriteFailure] = field(default_factory=list)


class SaveLedger:
    """One rank's record of the files it wrote into ``staging`` during one save.

    Safe to use from two threads at once (an asynchronous save writes the shards from its
    background thread while the training thread records the failures of its own writes)."""

    def __init__(self, staging: str | Path, rank: int) -> None:
        self.staging = Path(staging)
        self.report = RankReport(rank)
        self._lock = threading.Lock()

    def _record(self, path: Path, size: int, digest: str) -> None:
        with self._lock:
            self.report.files[str(path.relative_to(self.staging))] = {
                "size": size, "digest": digest, "rank": self.report.rank}

    def fail(self, path: str | Path | None, err: BaseException) -> None:
        if isinstance(err, OSError) and err.errno is not None:
            # A copy's error (shutil) names the source first and the file being written second.
            where = err.filename2 or err.filename or path
            cause = describe_os_error(OSError(err.errno, err.strerror))
        else:
            where, cause = path, describe_os_error(err)
        with self._lock:
            self.report.failures.append(WriteFailure(self.report.rank, str(where), cause))

    @property
    def failed(self) -> bool:
        return bool(self.report.failures)

    def torch_save(self, obj: Any, path: str | Path) -> None:
        """``torch.save`` into ``path``: fsynced, recorded; a failure is recorded, the partial file removed."""
        path = Path(path)
        fd = None
        sink = None
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                # DeepSpeed logs and ignores a failed makedirs; creating the folder here raises
                # the real cause (read-only, permission denied) with the folder's path.
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sink = _HashingFile(fd)
            torch_save_without_crc32(obj, sink)
            os.fsync(fd)
            done, fd = fd, None  # closed once, even when close itself fails (NFS reports late errors there)
            os.close(done)
            self._record(path, sink.size, sink.hasher.hexdigest())
        except Exception as err:  # recorded and agreed on by every rank, see the module docstring
            self.fail(path, sink.error if sink is not None and sink.error is not None else err)
            if fd is not None:
                os.close(fd)
            # A partial shard on a full disk only makes the disk fuller.
            path.unlink(missing_ok=True)

    def write_text(self, path: str | Path, text: str) -> None:
        path = Path(path)
        data = text.encode()
        try:
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._record(path, len(data), xxhash.xxh3_128(data).hexdigest())
        except Exception as err:
            self.fail(path, err)
            path.unlink(missing_ok=True)

    def adopt(self, path: str | Path) -> None:
        """Record (and fsync) a file written by code that does not go through this ledger."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._record(path, *digest_file(path))
        except Exception as err:
            self.fail(path, err)

    def guard(self, path: str | Path | None, run: Callable[[], Any]) -> None:
        """Run ``run``; an exception is recorded against ``path`` instead of raised."""
        try:
            run()
        except Exception as err:
            self.fail(path, err)


def failure_lines(failures: Iterable[WriteFailure]) -> list[str]:
    """One line per distinct cause: the ranks it hit and the first file it hit."""
    by_cause: dict[str, list[WriteFailure]] = {}
    for failure in failures:
        by_cause.setdefault(failure.cause, []).append(failure)
    lines = []
    for cause, hits in by_cause.items():
        ranks = sorted({hit.rank for hit in hits})
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
        more = f" (and {len(hits) - 1} more files)" if len(hits) > 1 else ""
        lines.append(f"{who} could not write {hits[0].path}{more}: {cause}")
    return lines


def assemble_manifest(staging: Path, reports: Iterable[RankReport], adopt: SaveLedger) -> dict[str, Any]:
    """Rank 0, after every rank reported success: the manifest of ``staging``, every file
    fsynced. Files in the folder that no ledger recorded (a writer DeepSpeed added that the routing
    does not know) are adopted by rank 0, so durability never depends on knowing every writer."""
    files: dict[str, dict[str, Any]] = {}
    for report in reports:
        files.update(report.files)
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames[:] = [d for d in dirnames if d not in NOT_IN_MANIFEST]
        for name in filenames:
            rel = str((Path(dirpath) / name).relative_to(staging))
            if rel not in files and rel != MANIFEST:
                adopt.adopt(Path(dirpath) / name)
    files.update(adopt.report.files)
    return {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}


def fsync_tree(folder: Path) -> None:
    """Every directory under ``folder`` (deepest first), so every file's entry is durable."""
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda entry: -entry[0].count(os.sep)):
        fsync_path(dirpath)


def manifest_text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def text_digest(text: str) -> str:
    return xxhash.xxh3_128(text.encode()).hexdigest()


def verifier_of(writer_rank: int, world_size: int) -> int:
    """Which rank checks a file at resume: the rank that wrote it where that rank still exists
    (its reads then warm the page cache for its own load), else spread round-robin."""
    return writer_rank % world_size


def memory_available() -> int | None:
    """The kernel's estimate of the memory that can be used without swapping (bytes), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_and_digest(path: Path, size: int, expected: str, held: dict[str, Any]) -> str:
    """The digest of ``path``; a torch zip file is read into memory in the same pass and, when
    size and digest are the expected ones, kept in ``held`` under its real path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        spans = record_spans(fd, size)
        if spans is None:
            return digest_file(path)[1]
        file, digest = read_held(path, spans, fd, size)
        if os.fstat(fd).st_size == size and digest == expected:
            held[os.path.realpath(path)] = file
        return digest
    finally:
        os.close(fd)


def verify(step_dir: str | Path, marker: Mapping[str, Any], rank: int = 0, world_size: int = 1,
           held: dict[str, Any] | None = None) -> str | None:
    """This rank's share of checking ``step_dir`` against its manifest; the first problem, or None.

    A checkpoint written before manifests existed (no ``manifest`` in its marker) has nothing to
    check against and is trusted as before. Rank 0 also checks the manifest itself against the
    digest the marker recorded.

    ``held``: the share's torch files are read into memory in the same pass as their digest
    (``preload``) and put there, real path -> ``HeldFile``, for the load to use instead of reading
    them again; pass it when this rank loads the files it checks (the same world size as the
    save). Where the share exceeds half the memory available, the files are only hashed. After a
    problem ``held`` is emptied: nothing unverified is kept.
    """
    step_dir = Path(step_dir)
    expected = marker.get("manifest")
    if expected is None:
        return None
    path = step_dir / MANIFEST
    try:
        text = path.read_text()
        if rank == 0 and text_digest(text) != expected:
            return f"{path}: content differs from the digest recorded in {step_dir.name}/COMPLETE"
        files = json.loads(text)["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return f"{path}: unreadable ({describe_os_error(err)})"
    mine = {rel: entry for rel, entry in files.items() if verifier_of(int(entry.get("rank", 0)), world_size) == rank}
    for rel, entry in mine.items():  # sizes first: a truncated file is found without reading anything
        try:
            size = (step_dir / rel).stat().st_size
        except FileNotFoundError:
            return f"{step_dir / rel}: missing"
        except OSError as err:
            return describe_os_error(err, step_dir / rel)
        if size != entry["size"]:
            return f"{step_dir / rel}: {size} bytes, the manifest says {entry['size']}"
    if held is not None:
        available = memory_available()
        if available is not None and 2 * sum(int(entry["size"]) for entry in mine.values()) > available:
            held = None
    for rel, entry in mine.items():
        try:
            if held is None:
                _, digest = digest_file(step_dir / rel)
            else:
                digest = _read_and_digest(step_dir / rel, int(entry["size"]), entry["digest"], held)
        except OSError as err:
            if held is not None:
                held.clear()
            return describe_os_error(err, step_dir / rel)
        if digest != entry["digest"]:
            if held is not None:
                held.clear()
            return f"{step_dir / rel}: content differs from the manifest ({ALGORITHM})"
    return None
