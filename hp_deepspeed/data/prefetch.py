"""Batches built ahead of the training step: a background producer and a bounded hand-over.

``Prefetcher(stream, device, depth)`` is an iterator over the same micro-batches as ``stream``,
in the same order, already on ``device``. A daemon thread draws the next batches from the stream
and collates them (while a helper thread builds the stream's next pool, or, with pools shared
through files, waits for its builder's file and maps it), pins them in
page-locked memory and starts their host-to-device copies on a side CUDA stream with
``non_blocking=True``, while the main thread runs the current step; at most ``depth`` batches
wait, ready, in a deque. The consumer's ``next`` then only pops a ready batch (and, on a GPU,
queues a wait for its copy): no condition variable, no Python-level lock. The
two threads wake each other through two plain locks used as level-triggered signals, touched
only when the deque is empty or was full. The time ``next`` still takes is ``last_wait_s``
(the data time left on the critical path).

Exact resume: the stream itself runs ahead of the model by up to ``depth + 1`` batches, so its
own ``state_dict`` is the *producer's* position. ``Prefetcher.state_dict`` is the consumer's: the
stream state the producer recorded right after drawing the last batch handed out, i.e. the
position of the next batch the model will see. Loading it into a fresh stream replays exactly
the batches that were prefetched but never consumed.

Errors: an exception raised while producing (a corrupt cache, a bug in collation) is re-raised
in the consumer at the ``next`` that would have returned that batch, with its traceback.
``close`` stops and joins the thread (the trainer calls it on a preemption or an exception in
the step), ending a wait for another rank's pool file too; it is idempotent, and a prefetcher that is garbage-collected also stops its thread.

Not owned here: what the batches are (``data.stream``), when the trainer saves.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Iterator, Mapping

import torch

_POLL_S = 0.1  # how often a thread blocked on the hand-over checks for close() or a dead producer


class _Job(threading.Thread):
    """One function run in a daemon thread; its result or exception kept for the joiner."""

    def __init__(self, fn):
        super().__init__(name="hp-deepspeed-pool", daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as error:  # noqa: BLE001 - re-raised by the producer
            self.error = error


def _signal(flag: threading.Lock) -> None:
    """Set a level-triggered signal: an unlocked lock means "look again". Only one thread
    releases a given flag and only the other acquires it, so a locked flag stays locked
    between the test and the release."""
    if flag.locked():
        flag.release()


class _Handoff:
    """A bounded single-producer, single-consumer hand-over of ready batches.

    The consumer's fast path is a deque pop and a length test; each side blocks only when it
    must (empty, or ``depth`` items waiting), on a lock the other side releases after its own
    deque operation, with a timeout so a stop or a dead producer is noticed. A wake-up is
    never lost: the flag stays released until the waiter takes it, and a stale release only
    makes the waiter look at the deque once more. The consumer wakes a producer blocked on a
    full deque only once at most ``depth // 2`` items are left, so the producer refills in
    bursts: fewer wake-ups (a system call on the consumer's path) and fewer GIL hand-overs,
    and a full deque always drains to that mark, so the producer is always woken in time."""

    def __init__(self, depth: int):
        self.depth = depth
        self.low = depth // 2
        self.items: collections.deque = collections.deque()
        self.filled = threading.Lock()  # released by the producer after an append
        self.space = threading.Lock()  # released by the consumer after a pop

    def put(self, item, stop: threading.Event) -> bool:
        """Append once fewer than ``depth`` items wait; False if ``stop`` was set first."""
        while len(self.items) >= self.depth:
            if stop.is_set():
                return False
            self.space.acquire(timeout=_POLL_S)
        self.items.append(item)
        _signal(self.filled)
        return True

    def get(self, producer: threading.Thread):
        """The oldest item, waiting for one; RuntimeError if the producer died without one."""
        while True:
            try:
                item = self.items.popleft()
            except IndexError:
                if not self.filled.acquire(timeout=_POLL_S) and not producer.is_alive() and not self.items:
                    raise RuntimeError("the batch prefetch thread stopped without a batch or an error") from None
                continue
            if len(self.items) <= self.low:
                _signal(self.space)
            return item


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device, copy_stream) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    with torch.cuda.stream(copy_stream):
        # Pinned source memory lets the copy run asynchronously to this thread and to the step.
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class Prefetcher:
    """Iterator over ``stream``'s batches on ``device``, ``depth`` batches built ahead (see the
    module docstring). ``stream`` must have ``state_dict()`` and must not be used elsewhere while
    the prefetcher runs."""

    def __init__(self, stream, device: torch.device | str = "cpu", depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.stream = stream
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the caller's current GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = depth
        self.last_wait_s = 0.0
        self.consumed = 0
        self._state = stream.state_dict()  # nothing consumed yet: the stream's own position
        self._handoff = _Handoff(depth)
        self._stop = threading.Event()
        self._done = False
        self._pool_job: _Job | None = None
        self._copy_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._produce, name="hp-deepspeed-prefetch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer (background thread)
    def _put(self, item) -> bool:
        return self._handoff.put(item, self._stop)

    def _build_pools_ahead(self) -> None:
        """Keep one build of the stream's next pool running in a helper thread (numpy's sorts
        release the GIL), so crossing into a pool does not stall the hand-over for a whole pool's
        construction; at the boundary, wait for that build rather than start another."""
        job = self._pool_job
        # A failed build is reported when its pool is needed, at the batch that would use it.
        if job is not None and (self.stream.needs_pool() or (not job.is_alive() and job.error is None)):
            job.join()
            self._pool_job = None
            if job.error is not None:
                raise job.error
            self.stream.install_pool(job.result)
        if self._pool_job is None:
            builder = self.stream.next_pool_builder()
            if builder is not None:
                self._pool_job = _Job(builder)

    def _produce(self) -> None:
        if self.device.type == "cuda":
            # Per thread: without it this thread's pinned allocations would open a context on GPU 0.
            torch.cuda.set_device(self.device)
        ahead = all(hasattr(self.stream, name) for name in ("next_pool_builder", "install_pool", "needs_pool"))
        try:
            while not self._stop.is_set():
                if ahead:
                    self._build_pools_ahead()
                try:
                    batch = next(self.stream)
                except StopIteration:
                    self._put(_END)
                    return
                state = self.stream.state_dict()  # the position after this batch
                batch = _to_device(batch, self.device, self._copy_stream)
                ready = None
                if self._copy_stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(self._copy_stream)
                if not self._put((batch, state, ready)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(error))

    # ------------------------------------------------------------------ consumer (training thread)
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._done:
            raise StopIteration
        started = time.perf_counter()
        try:
            item = self._handoff.get(self._thread)
        except RuntimeError:
            self._done = True
            raise
        if item is _END or isinstance(item, _Failure):
            self._done = True
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        batch, state, ready = item
        if ready is not None:
            # The step's kernels are queued after the copy, without blocking the host.
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in batch.values():
                # The copy stream allocated this memory; the step stream now uses it.
                tensor.record_stream(current)
        self.last_wait_s = time.perf_counter() - started
        self._state = state
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The stream position of the next batch ``next`` returns (not the producer's)."""
        return self._state

    def close(self) -> None:
        """Stop the producer and join it; batches still queued are dropped (their position is
        not in ``state_dict``, so a resume replays them)."""
        self._stop.set()
        # A producer or pool builder waiting for another rank's pool file stops waiting; the
        # stream may wait again once this prefetcher is gone.
        pool_files = getattr(self.stream, "pool_files", None)
        if pool_files is not None:
            pool_files.stop.set()
        try:
            while self._thread.is_alive():
                self._handoff.items.clear()  # unblock a producer waiting on a full deque
                _signal(self._handoff.space)
                self._thread.join(timeout=_POLL_S)
            if self._pool_job is not None:
                self._pool_job.join()
        finally:
            if pool_files is not None:
                pool_files.stop.clear()
        self._done = True

    def __del__(self):
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
