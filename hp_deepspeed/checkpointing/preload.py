"""The resume's single pass over a checkpoint file: read into this process's memory and hashed
as it is read, so that the bytes DeepSpeed later loads are the bytes the digest vouched for.

Owns ``read_held``: one torch zip file (what ``torch.save`` writes) read sequentially, each large
record into a private buffer of its own (anonymous memory, transparent huge pages where the
kernel offers them), the small records and the zip's headers into byte strings, while a second
thread feeds the same bytes, in file order, to the xxh3-128 digest ``integrity`` records at save
time. The result (``HeldFile``) is kept only when size and digest match the manifest; the load
then builds tensors over those buffers without reading or copying the file again
(``compat.checkpoint.load_held``).

Why: verifying first and loading afterwards read every byte twice (the second time from the page
cache) and then copied Adam's moments once more out of the file mapping. Here the disk is read
once, the kernel's copy into the final buffers overlaps the disk, and the moments keep the
buffers they were read into. Does not own which files a rank reads, nor the fallback when one
fails (``integrity.verify``, ``manager``).
"""

from __future__ import annotations

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

# Read and hashed in pieces small enough that the digest thread finds them still in the CPU's
# cache, where the read just wrote them: the hash then costs no second trip through memory.
CHUNK = 2 << 20
# The disk is asked for this much, this far ahead of the piece being read: enough to keep it busy
# while the copy and the hash run, not so much that the request queue stalls the reader.
AHEAD_STEP = 16 << 20
AHEAD = 32 << 20
# Records from this size up get a buffer of their own; smaller ones stay in the byte strings.
OWN_BUFFER = 1 << 20
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
    """Anonymous memory for one record; huge pages cut the page faults of filling it."""
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buffer.madvise(advice)
        except OSError:  # a kernel without transparent huge pages: small pages, same result
            pass
    return buffer


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


def read_held(path: str | Path, spans: list[tuple[int, int]], fd: int, size: int) -> tuple[HeldFile, str]:
    """Read the whole file ``fd`` (``size`` bytes) into held pieces, each span of ``spans`` into a
    private buffer; returns the held file and its xxh3-128 digest. OSError when the file is
    shorter than ``size`` or cannot be read."""
    held = HeldFile(str(path), size, "")
    pieces: list[tuple[int, object]] = []
    at = 0
    for start, nbytes in spans:
        if start > at:
            pieces.append((at, bytearray(start - at)))
        pieces.append((start, _private_buffer(nbytes)))
        at = start + nbytes
    if size > at:
        pieces.append((at, bytearray(size - at)))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    chunks = [(offset + lo, memoryview(buffer)[lo:lo + CHUNK])
              for offset, buffer in pieces for lo in range(0, len(buffer), CHUNK)]
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
    held.pieces = pieces
    for offset, buffer in pieces:
        if isinstance(buffer, mmap.mmap):
            held.records[offset] = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    return held, hasher.hasher.hexdigest()
