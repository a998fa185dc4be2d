"""The resume's single pass over a checkpoint file: read into this process's memory and hashed
as it is read, so that the bytes DeepSpeed later loads are the bytes the digest vouched for.

Owns ``read_held``: one torch zip file (what ``torch.save`` writes) read into memory, each large
record into a private buffer of its own (anonymous memory, transparent huge pages where the
kernel offers them), the small records and the zip's headers into buffers between them, while
the same bytes are fed, in file order, to the xxh3-128 digest ``integrity`` records at save time.
A large file that is not in the page cache is read directly (O_DIRECT), several requests in flight
straight into those buffers; otherwise it is read through the page cache as one stream. The result
(``HeldFile``) is kept only when size and digest match the manifest; the load then builds tensors
over those buffers without reading or copying the file again (``compat.checkpoint.load_held``).

Why: verifying first and loading afterwards read every byte twice (the second time from the page
cache) and then copied Adam's moments once more out of the file mapping. Here the disk is read
once, into the final buffers, and the moments keep the buffers they were read into; a cold read
keeps more than one request at the disk, which one sequential stream does not. Does not own which
files a rank reads, nor the fallback when one fails (``integrity.verify``, ``manager``).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import struct
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

logger = logging.getLogger(__name__)

# Read and hashed in pieces small enough that the digest thread finds them still in the CPU's
# cache, where the read just wrote them: the hash then costs no second trip through memory.
CHUNK = 2 << 20
# The disk is asked for this much, this far ahead of the piece being read: enough to keep it busy
# while the copy and the hash run, not so much that the request queue stalls the reader.
AHEAD_STEP = 16 << 20
AHEAD = 32 << 20
# Records from this size up get a buffer of their own; smaller ones stay in the buffers of the
# headers between them.
OWN_BUFFER = 1 << 20
# Direct reads (O_DIRECT) go in whole blocks: offsets, lengths and buffer addresses (4 KiB covers
# the 512-byte disks too). Several requests in flight keep the disk busier than the kernel's
# read-ahead of one sequential stream does, and the bytes land in the final buffers without the
# page cache's copy (less CPU on a busy host); files from DIRECT_FROM up that are not in the page
# cache are read so. DIRECT: None decides per file; True or False forces one way (tests).
ALIGN = 4096
DIRECT_CHUNK = 4 << 20
DIRECT_READERS = 8
DIRECT_FROM = 64 << 20
DIRECT: bool | None = None
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass
class HeldFile:
    """One checkpoint file held in memory, verified against the manifest."""

    path: str
    size: int
    digest: str
    pieces: list[tuple[int, object]] = field(default_factory=list)
    """(file offset, buffer) in file order, covering the whole file without gaps or overlaps."""
    records: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    """Data offset -> storage of every record that has a buffer of its own."""

    def read_at(self, offset: int, length: int) -> bytes:
        """Bytes ``offset:offset+length`` of the file, from the held pieces."""
        out = bytearray()
        for start, buffer in self.pieces:
            end = start + len(buffer)
            if end <= offset or length <= len(out):
                continue
            lo = max(offset + len(out), start)
            hi = min(offset + length, end)
            if lo >= hi:
                break
            out += memoryview(buffer)[lo - start:hi - start]
        return bytes(out)

    def storage_at(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        """The record whose data starts at ``offset`` (its own buffer, or a copy of a small one)."""
        storage = self.records.get(offset)
        if storage is not None:
            if storage.nbytes() != nbytes:
                raise ValueError(f"{self.path}: record at byte {offset} holds {storage.nbytes()} bytes, "
                                 f"the pickle asks for {nbytes}")
            return storage
        data = self.read_at(offset, nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{self.path}: record at byte {offset} runs past the end of the file")
        return torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if nbytes else torch.UntypedStorage(0)

    def private_pointers(self) -> set[int]:
        """The data pointers of the records' own buffers (tensors over them need no copy)."""
        return {storage.data_ptr() for storage in self.records.values()}


def record_spans(fd: int, size: int) -> list[tuple[int, int]] | None:
    """(data offset, size) of every record of the torch zip file ``fd`` that gets its own buffer,
    in file order; None when the file is not an uncompressed zip (the caller then only hashes it).

    Reads the zip's central directory and each large record's local header (a few small reads);
    the load later checks these offsets against torch's own reader over the verified bytes."""
    try:
        with os.fdopen(os.dup(fd), "rb") as fh, zipfile.ZipFile(fh) as archive:  # a passed file stays open
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    spans = []
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            return None
        if entry.file_size < max(OWN_BUFFER, 1):
            continue
        header = os.pread(fd, LOCAL_HEADER.size, entry.header_offset)
        if len(header) != LOCAL_HEADER.size:
            return None
        signature, name_length, extra_length = LOCAL_HEADER.unpack(header)
        if signature != LOCAL_SIGNATURE:
            return None
        start = entry.header_offset + LOCAL_HEADER.size + name_length + extra_length
        if start + entry.file_size > size:
            return None
        spans.append((start, entry.file_size))
    spans.sort()
    if any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
        return None
    return spans


def _private_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory (page-aligned, as O_DIRECT wants it); huge pages cut the page faults of
    filling it."""
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buffer.madvise(advice)
        except OSError:  # a kernel without transparent huge pages: small pages, same result
            pass
    return buffer


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class _Piece:
    """Bytes ``start:end`` of the file, in a buffer of their own that starts at the block
    boundary ``base`` at or before ``start`` (so that a direct read can fill it in whole blocks;
    the few bytes before ``start`` and after ``end`` belong to the neighbouring pieces)."""

    start: int
    end: int
    base: int
    buffer: mmap.mmap
    own: bool
    """A record of its own (a tensor's bytes), not headers and small records."""

    def view(self) -> memoryview:
        return memoryview(self.buffer)[self.start - self.base:self.end - self.base]


def _layout(spans: list[tuple[int, int]], size: int) -> list[_Piece]:
    bounds, at = [], 0
    for start, nbytes in spans:
        if start > at:
            bounds.append((at, start, False))
        bounds.append((start, start + nbytes, True))
        at = start + nbytes
    if size > at:
        bounds.append((at, size, False))
    pieces = []
    for lo, hi, own in bounds:
        base = lo - lo % ALIGN
        pieces.append(_Piece(lo, hi, base, _private_buffer(_round_up(hi, ALIGN) - base), own))
    return pieces


class _Hasher(threading.Thread):
    """Hashes the chunks it is handed, in order, while the reader fills the next ones (xxhash
    releases the GIL on large inputs, and so does the read)."""

    def __init__(self) -> None:
        super().__init__(name="checkpoint-digest", daemon=True)
        self.hasher = xxhash.xxh3_128()
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.hasher.update(chunk)


def _read_through_cache(path: str | Path, pieces: list[_Piece], fd: int, size: int) -> str:
    """One sequential stream through the page cache, the disk asked ahead, a second thread
    hashing each ``CHUNK`` while it is still in the CPU's cache; returns the digest."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    chunks = [(piece.start + lo, piece.view()[lo:lo + CHUNK])
              for piece in pieces for lo in range(0, piece.end - piece.start, CHUNK)]
    hasher = _Hasher()
    hasher.start()
    asked = 0  # the disk was asked for everything below this offset
    try:
        for offset, view in chunks:
            while asked < min(offset + AHEAD, size):
                try:
                    os.posix_fadvise(fd, asked, AHEAD_STEP, os.POSIX_FADV_WILLNEED)
                except (AttributeError, OSError):
                    pass
                asked += AHEAD_STEP
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise OSError(f"{path}: file ended at byte {offset + done}, expected {size} bytes")
                done += n
            hasher.chunks.put(view)
    finally:
        hasher.chunks.put(None)
        hasher.join()
    return hasher.hasher.hexdigest()


def _read_direct(path: str | Path, pieces: list[_Piece], size: int) -> str:
    """``DIRECT_READERS`` threads read the file in file order, ``DIRECT_CHUNK`` at a time,
    straight into the pieces' buffers (O_DIRECT: no page cache, no copy), while this thread hashes
    each chunk, in file order, as soon as it is in; returns the digest. OSError where the file
    system refuses direct reads or a read fails (the caller then reads through the page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        requests = [(piece, offset, min(DIRECT_CHUNK, stop - offset))
                    for piece in pieces for stop in (_round_up(piece.end, ALIGN),)
                    for offset in range(piece.base, stop, DIRECT_CHUNK)]
        done = [threading.Event() for _ in requests]
        errors: list[BaseException] = []
        taken = iter(range(len(requests)))  # shared: each reader takes the next request in file order
        lock = threading.Lock()

        def reader() -> None:
            try:
                while not errors:
                    with lock:
                        i = next(taken, None)
                    if i is None:
                        return
                    piece, offset, length = requests[i]
                    view = memoryview(piece.buffer)[offset - piece.base:offset - piece.base + length]
                    got = 0
                    while got < length:
                        n = os.preadv(fd, [view[got:]], offset + got)
                        got += n
                        if n == 0 or n % ALIGN:  # the end of the file (a direct read goes on in whole blocks)
                            break
                    if offset + got < min(offset + length, piece.end):
                        raise OSError(f"{path}: file ended at byte {offset + got}, expected {size} bytes")
                    done[i].set()
            except BaseException as err:  # raised in the calling thread below
                errors.append(err)
                for event in done:
                    event.set()

        readers = [threading.Thread(target=reader, name=f"checkpoint-read-{j}", daemon=True)
                   for j in range(min(DIRECT_READERS, len(requests)))]
        for thread in readers:
            thread.start()
        hasher = xxhash.xxh3_128()
        try:
            for (piece, offset, length), event in zip(requests, done):
                event.wait()
                if errors:
                    break
                lo, hi = max(offset, piece.start), min(offset + length, piece.end)
                if lo < hi:  # the neighbours' bytes at either edge are hashed with their own piece
                    hasher.update(memoryview(piece.buffer)[lo - piece.base:hi - piece.base])
        finally:
            if not errors and any(not event.is_set() for event in done):
                errors.append(RuntimeError("interrupted"))  # the readers stop at their next request
            for thread in readers:
                thread.join()
        if errors:
            raise errors[0]
        return hasher.hexdigest()
    finally:
        os.close(fd)


def in_page_cache(fd: int, size: int) -> bool:
    """Whether a few pages spread over the file are in the page cache: a read that would wait for
    the disk is refused instead (RWF_NOWAIT). False where the kernel cannot tell."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or size == 0:
        return False
    probe = bytearray(1)
    for offset in (0, size // 2, size - 1):
        try:
            os.preadv(fd, [probe], offset, nowait)
        except OSError:  # BlockingIOError: not cached; EOPNOTSUPP: cannot tell
            return False
    return True


def _direct_wanted(fd: int, size: int) -> bool:
    if DIRECT is not None:
        return DIRECT and hasattr(os, "O_DIRECT")
    return hasattr(os, "O_DIRECT") and size >= DIRECT_FROM and not in_page_cache(fd, size)


def read_held(path: str | Path, spans: list[tuple[int, int]], fd: int, size: int) -> tuple[HeldFile, str]:
    """Read the whole file ``fd`` (``size`` bytes) into held pieces, each span of ``spans`` into a
    buffer of its own; returns the held file and its xxh3-128 digest. OSError when the file is
    shorter than ``size`` or cannot be read.

    A large file that is not in the page cache is read directly (``_read_direct``); one in the
    page cache, a small one, or one on a file system that refuses direct reads is read through the
    page cache (``_read_through_cache``). Both hash the same bytes in the same order."""
    pieces = _layout(spans, size)
    digest = None
    if _direct_wanted(fd, size):
        try:
            digest = _read_direct(path, pieces, size)
        except OSError as err:
            # File systems refuse O_DIRECT in several ways (EINVAL on tmpfs and some network file
            # systems, EOPNOTSUPP or EIO elsewhere). Any failure here is retried through the page
            # cache, which raises a real error again: an unusual file system must not make a
            # good checkpoint look unreadable and send the resume back to an older one.
            logger.debug("%s: direct read failed (%s); reading through the page cache", path, err)
    if digest is None:
        digest = _read_through_cache(path, pieces, fd, size)
    held = HeldFile(str(path), size, "", pieces=[(piece.start, piece.view()) for piece in pieces])
    for piece in pieces:
        if piece.own:
            held.records[piece.start] = torch.frombuffer(
                piece.buffer, dtype=torch.uint8, count=piece.end - piece.start,
                offset=piece.start - piece.base).untyped_storage()
    return held, digest
