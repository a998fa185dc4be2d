"""The training stream: mixture sampling, length bucketing, rank sharding, resumable state.

Design: there is one global, rank-independent stream of global batches of
``G = micro_batch_size * world_size * accumulation`` examples, one per optimizer step; at
micro-step ``a`` of a step, rank ``r`` takes the ``(a * world_size + r)``-th contiguous slice
of ``micro_batch_size`` examples of the step's global batch (so the ranks of one micro-step hold
neighbouring lengths and finish it at about the same time). Gradient accumulation therefore cuts
the global batch as more ranks would: one GPU with 8 micro-steps gets the micro-batches 8 GPUs
would get. The stream is built pool by pool; pool
``p`` is a pure function of ``(seed, p, G, bucket_pool_batches, batch_mixing, per-task offsets
at the start of pool p)``:

1. ``P*G`` task draws from the mixing rates (``np.random.default_rng([seed, p, 0])``);
2. the ``c``-th draw of task ``k`` overall takes position ``c`` of task ``k``'s example
   sequence, which is epoch after epoch of a fresh permutation of its examples (seeded by
   ``seed``, the task name and the epoch), so within an epoch of a task no example repeats:
   no two ranks and no two steps see the same example of the same epoch. (Epochs are counted
   in draws of the task; in a pool that straddles an epoch boundary the last examples of one
   epoch and the first of the next are interleaved, so there an example may recur after
   fewer than ``len(task)`` draws, once per epoch.)
3. the pool is cut into ``P`` global batches, and the batches are shuffled
   (``default_rng([seed, p, 1])``; shuffling removes the length curriculum). How it is cut is
   ``data.batch_mixing``:

   * ``stratified`` (default): each task's draws are ranked by (input length, target length)
     and the pool is ordered by that rank's quantile, so batch ``j`` holds the ``j``-th
     length slice of *every* task: each task at its share of the pool's draws (the mixing
     rate, to one example) in every batch, and each task's examples of similar lengths;
   * ``length``: the pool is sorted by (input length, target length) and cut. Least padding
     when a micro-batch spans several tasks, but batches cluster by task, since tasks differ
     in length: the mixture then holds only on average over many steps.

   Inside a global batch the examples are in (input length, target length) order and rank
   ``r`` takes the ``r``-th contiguous slice, so a rank's micro-batch spans a narrow range of
   lengths and dynamic padding wastes few tokens (bench/batching.py measures both modes; the
   trade-off is in data/config.py's ``batch_mixing``).

With ``data.packing`` a rank's micro-batch is the same examples laid end to end in as few
rows as fit, with segment ids for the model's masks (``pack_rows``, ``packed_batch``): the draws,
the batches and the state are those above, so packing changes only the layout of a batch.

What a rank computes: where a batch is cut, and which examples fall in a rank's slice, depends
on the length of every draw of the pool, so building a pool is O(P*G) work (a few vectorised
numpy sorts), O(G) per step, whoever does it. With ``pool_dir`` (the trainer's
``<run.dir>/data_pools``, ``data.share_pools``) and more than one rank, pool ``p`` is built once
per job, by rank ``p % world_size``, which writes every batch's rows in length order to a file
keyed by everything the pool is a function of; the other ranks map the file and read only
their rows (data/shared_pools.py). A rank then pays O(micro) per step plus one build every
``world_size`` pools: flat in the world size. Without it (one rank, or ``share_pools: off``)
every rank builds every pool itself, and of each global batch partitions out, sorts and
collates only its own slice. The batches are the same either way. ``next_pool_builder`` lets
data/prefetch.py build (or wait for and map) the next pool in a helper thread while the current
one is handed out.

The state is ``(pool, batch within pool, examples of that batch already taken by all ranks,
per-task offsets at the pool start)``, plain JSON; at a step boundary it is the same whatever
the world size and accumulation.
Guarantees on ``load_state_dict``:

* same tasks, seed, sizes, global batch size and pool size (any world size and accumulation
  whose ``micro_batch_size * world_size * accumulation`` equals the saved ``G``): the identical
  global sequence of batches continues; each rank's share is its slice of it;
* a different global batch size or pool size: the stream continues at the start of the
  next pool with the per-task offsets consumed so far, so no example of the current epoch is
  repeated; the rest of the interrupted pool (fewer than ``bucket_pool_batches`` batches) is
  not seen in this epoch;
* different tasks, task sizes, mixing rates or seed: ``ValueError`` (it would be another
  stream).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from hp_deepspeed.data.config import DataConfig, resolve_packing
from hp_deepspeed.data.shared_pools import PoolFiles, pool_key
from hp_deepspeed.data.tasks import DataError, Task
from hp_deepspeed.data.tokenization import TokenizedSplit, load_split

logger = logging.getLogger(__name__)

STATE_VERSION = 1
LABEL_PAD = -100


def mixing_rates(cfg: DataConfig, names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """Probability of drawing each task (T5 section 3.5.2).

    ``proportional``: min(size, cap); ``temperature``: min(size, cap) ** (1/T);
    ``weights``: ``cfg.weights[name]``; all normalised to sum to one."""
    if cfg.mixture == "weights":
        missing = [n for n in names if n not in cfg.weights]
        extra = sorted(set(cfg.weights) - set(names))
        if missing or extra:
            raise DataError(
                f"data.weights must give a weight to exactly the training tasks {list(names)}; "
                f"missing {missing}, not training tasks {extra}"
            )
        raw = np.array([cfg.weights[n] for n in names], dtype=np.float64)
        if (raw < 0).any() or raw.sum() <= 0:
            raise DataError(f"data.weights must be non-negative and not all zero, got {cfg.weights}")
    else:
        raw = np.array(sizes, dtype=np.float64)
        if cfg.mixture_cap is not None:
            raw = np.minimum(raw, cfg.mixture_cap)
        if cfg.mixture == "temperature":
            if cfg.temperature <= 0:
                raise DataError(f"data.temperature must be positive, got {cfg.temperature}")
            raw = raw ** (1.0 / cfg.temperature)
    return raw / raw.sum()


def _gather(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a ragged array, right-padded with ``fill`` into one int64 matrix, and
    the matrix's mask of real entries."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    width = int(lengths.max()) if len(rows) else 0
    columns = np.arange(width)
    real = columns < lengths[:, None]
    out = np.full((len(rows), width), fill, dtype=np.int64)
    out[real] = ids[(starts[:, None] + columns)[real]]
    return out, real


def collate(
    splits: Sequence[TokenizedSplit], items, task_ids: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Dynamically padded batch of ``(split index, example index)`` items (a sequence of pairs
    or an [N, 2] array): ``input_ids`` and ``attention_mask`` [B, S], ``labels`` [B, T] (-100 on
    padding), ``task_ids`` [B]. Vectorised per split: one gather per split, no per-row copies."""
    items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
    n = len(items)
    in_lengths = np.empty(n, dtype=np.int64)
    tgt_lengths = np.empty(n, dtype=np.int64)
    present = np.unique(items[:, 0])
    for k in present:
        at = items[:, 0] == k
        in_lengths[at] = np.diff(splits[k].input_offsets)[items[at, 1]]
        tgt_lengths[at] = np.diff(splits[k].target_offsets)[items[at, 1]]
    input_ids = np.full((n, int(in_lengths.max())), pad_id, dtype=np.int64)
    attention_mask = np.zeros(input_ids.shape, dtype=np.int64)
    labels = np.full((n, int(tgt_lengths.max())), LABEL_PAD, dtype=np.int64)
    for k in present:
        at = np.flatnonzero(items[:, 0] == k)
        split = splits[k]
        x, real = _gather(split.input_ids, split.input_offsets, items[at, 1], pad_id)
        input_ids[at, : x.shape[1]] = x
        attention_mask[at, : x.shape[1]] = real
        y, _ = _gather(split.target_ids, split.target_offsets, items[at, 1], LABEL_PAD)
        labels[at, : y.shape[1]] = y
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "task_ids": torch.from_numpy(np.asarray(task_ids, dtype=np.int64)[items[:, 0]]),
    }


class PackedLayout(NamedTuple):
    """Where ``pack_rows`` puts each example of a micro-batch (all arrays [examples])."""

    row: np.ndarray
    """The row the example lies in."""
    segment: np.ndarray
    """Its segment number within the row, 1-based (0 is padding in the segment-id arrays)."""
    input_start: np.ndarray
    """First column of its input in the row."""
    target_start: np.ndarray
    """First column of its target in the row."""
    rows: int
    input_width: int
    """Columns of the packed inputs (the fullest row's input tokens)."""
    target_width: int
    segments: int
    """Most segments in one row."""


# Packing takes the first layout (narrowest rows first) whose padding is at most this fraction of
# its real tokens: searching on could save at most that much, at one more spread per row count.
_PACKED_SLACK = 0.03


def _balanced_rows(order: list[int], in_len: list[int], tgt_len: list[int], rows: int) -> tuple[list[int], int, int]:
    """Longest first, each example to the row with the fewest input tokens so far (the lowest
    row on a tie): the "longest processing time" rule of scheduling, whose fullest row is within
    4/3 of the best possible. Returns each example's row and the fullest row's input and target
    tokens. Plain Python: a micro-batch has a few dozen examples, where numpy's per-call
    overhead would dominate."""
    row_of = [0] * len(in_len)
    fill_in, fill_tgt = [0] * rows, [0] * rows
    for i in order:
        r = fill_in.index(min(fill_in))
        fill_in[r] += in_len[i]
        fill_tgt[r] += tgt_len[i]
        row_of[i] = r
    return row_of, max(fill_in), max(fill_tgt)


def pack_rows(input_lengths: np.ndarray, target_lengths: np.ndarray, max_input: int, max_target: int) -> PackedLayout:
    """Pack examples end to end into rows of at most ``max_input`` input and ``max_target``
    target tokens; the layout is a function of the lengths only.

    For a row count R the examples are spread over R rows longest first, each to the emptiest
    row (``_balanced_rows``); its cost is its cells, R x (input width + target width), the widths
    those of the fullest row. Row counts are tried from the most that can help (rows no
    narrower than the longest example) down to the fewest that hold the tokens, and the first
    layout within ``_PACKED_SLACK`` of no padding at all is taken, else the one with the fewest
    cells, one example per row included. Narrow rows first, since attention's cost grows with
    the square of a row's length; the early stop keeps the layouts tried few (bench/batching.py
    measures the cost)."""
    in_len = np.asarray(input_lengths, dtype=np.int64)
    tgt_len = np.asarray(target_lengths, dtype=np.int64)
    n = len(in_len)
    in_list, tgt_list = in_len.tolist(), tgt_len.tolist()
    longest_in, longest_tgt = max(in_list), max(tgt_list)
    max_input, max_target = max(max_input, longest_in), max(max_target, longest_tgt)
    total_in, total_tgt = sum(in_list), sum(tgt_list)
    order = sorted(range(n), key=lambda i: (-in_list[i], -tgt_list[i], i))
    fewest = max(-(-total_in // max_input), -(-total_tgt // max_target))
    most = max(fewest, min(n, -(-total_in // longest_in)))
    good_enough = (total_in + total_tgt) * (1 + _PACKED_SLACK)
    # One example per row (the unpacked layout, cut to each row's length) is the fallback, so
    # packing never pads more than not packing.
    one_each = [0] * n
    for position, i in enumerate(order):
        one_each[i] = position
    best = (n * (longest_in + longest_tgt), one_each, n, longest_in, longest_tgt)
    for rows in range(most, fewest - 1, -1):
        row_of, width_in, width_tgt = _balanced_rows(order, in_list, tgt_list, rows)
        if width_in > max_input or width_tgt > max_target:
            break  # fewer rows would be wider still
        cells = rows * (width_in + width_tgt)
        if cells < best[0]:
            best = (cells, row_of, rows, width_in, width_tgt)
        if cells <= good_enough:
            break
    _, row_of, used, width_in, width_tgt = best
    # Along a row, examples follow in placement order (longest first), end to end.
    segment, input_start, target_start = [0] * n, [0] * n, [0] * n
    count, fill_in, fill_tgt = [0] * used, [0] * used, [0] * used
    for i in order:
        r = row_of[i]
        count[r] += 1
        segment[i], input_start[i], target_start[i] = count[r], fill_in[r], fill_tgt[r]
        fill_in[r] += in_list[i]
        fill_tgt[r] += tgt_list[i]
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return PackedLayout(as_array(row_of), as_array(segment), as_array(input_start), as_array(target_start), used,
                        width_in, width_tgt, max(count))


def _scatter_tokens(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, destinations: np.ndarray,
                    out: np.ndarray, segment_out: np.ndarray, segment: np.ndarray) -> None:
    """Copy example ``i``'s ``lengths[i]`` ids from ``ids[starts[i]:]`` to the flat positions
    ``destinations[i]:`` of ``out``, and its segment number to ``segment_out``; one gather."""
    example = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    at = destinations[example] + within
    out.reshape(-1)[at] = ids[starts[example] + within]
    segment_out.reshape(-1)[at] = segment[example]


def packed_batch(inputs: tuple[np.ndarray, np.ndarray, np.ndarray], targets: tuple[np.ndarray, np.ndarray, np.ndarray],
                 task_ids: np.ndarray, pad_id: int, max_input: int, max_target: int) -> dict[str, torch.Tensor]:
    """The packed training batch of examples given as ``(flat ids, starts, lengths)`` of their
    inputs and of their targets, and their task ids (see ``pack_rows`` for the layout):

    ``input_ids``, ``attention_mask``, ``input_segment_ids`` [R, Li]; ``labels`` (-100 on
    padding), ``target_segment_ids`` [R, Lt]; ``segment_task_ids`` [R, S] (-1 where a row has
    fewer segments). Segment ids are 0 on padding, 1..k along a row. The decoder inputs are the
    model's to derive (``T5Model.shift_right`` with the target segment ids), so the decoder start
    token comes from the model's config, as unpacked."""
    in_ids, in_starts, in_len = inputs
    tgt_ids, tgt_starts, tgt_len = targets
    layout = pack_rows(in_len, tgt_len, max_input, max_target)
    input_ids = np.full((layout.rows, layout.input_width), pad_id, dtype=np.int64)
    input_segments = np.zeros(input_ids.shape, dtype=np.int64)
    labels = np.full((layout.rows, layout.target_width), LABEL_PAD, dtype=np.int64)
    target_segments = np.zeros(labels.shape, dtype=np.int64)
    _scatter_tokens(in_ids, in_starts, in_len, layout.row * layout.input_width + layout.input_start,
                    input_ids, input_segments, layout.segment)
    _scatter_tokens(tgt_ids, tgt_starts, tgt_len, layout.row * layout.target_width + layout.target_start,
                    labels, target_segments, layout.segment)
    segment_task_ids = np.full((layout.rows, layout.segments), -1, dtype=np.int64)
    segment_task_ids[layout.row, layout.segment - 1] = task_ids
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy((input_segments > 0).astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "input_segment_ids": torch.from_numpy(input_segments),
        "target_segment_ids": torch.from_numpy(target_segments),
        "segment_task_ids": torch.from_numpy(segment_task_ids),
    }


def _draw_tasks(rng: np.random.Generator, rates: np.ndarray, size: int) -> np.ndarray:
    """``rng.choice(len(rates), size, p=rates)``, the same draws: numpy draws one uniform per
    position and takes the number of cumulative rates at or below it. With few tasks that count
    is a few comparisons per draw, several times cheaper than numpy's binary search."""
    cdf = rates.cumsum()
    cdf /= cdf[-1]
    uniform = rng.random(size)
    if len(rates) > 32:
        return cdf.searchsorted(uniform, side="right")
    draws = np.zeros(size, dtype=np.uint8)
    for bound in cdf[:-1]:  # the last bound is 1.0, above every uniform
        np.add(draws, uniform >= bound, out=draws, casting="unsafe")
    return draws


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """Indices that sort ``keys`` (non-negative, below ``bound``) stably; numpy sorts keys of
    16 bits or less by radix, in linear time."""
    if bound <= 2**16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


class _FlatIds:
    """The ids of every training split in one array per column, so a micro-batch spanning
    several tasks is gathered with a few array operations instead of a few per task. The
    splits' own id arrays become views of it (no second copy)."""

    def __init__(self, splits: Sequence[TokenizedSplit], ids: str, offsets: str):
        self.ids = np.concatenate([getattr(s, ids) for s in splits])
        id_base = np.cumsum([0] + [len(getattr(s, ids)) for s in splits])
        for split, lo, hi in zip(splits, id_base[:-1], id_base[1:]):
            setattr(split, ids, self.ids[lo:hi])
        self.starts = np.concatenate([getattr(s, offsets)[:-1] + b for s, b in zip(splits, id_base)])
        self.lengths = np.concatenate([np.diff(getattr(s, offsets)) for s in splits])

    def gather(self, examples: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded int64 rows of the given (global) examples and their mask of real ids."""
        starts, lengths = self.starts[examples], self.lengths[examples]
        columns = np.arange(int(lengths.max()))
        real = columns < lengths[:, None]
        out = np.full(real.shape, fill, dtype=np.int64)
        out[real] = self.ids[(starts[:, None] + columns)[real]]
        return out, real


class _Pool:
    """One pool: its draws, how many examples it took of each task, and its cut into global
    batches (in consumption order). A batch's length order, or only one rank's slice of it, is
    computed when asked for, so a rank sorts nothing of the batches it does not take part in.
    ``length_code`` numbers the pool's (input length, target length) pairs in increasing order."""

    def __init__(self, draws, examples, counts, parts, length_code, global_batch):
        self.draws, self.examples, self.counts = draws, examples, counts
        self.parts, self.length_code, self.global_batch = parts, length_code, global_batch

    def batch(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the ``i``-th batch in (input length, target length, pool
        position) order, as a [rows, 2] array of (task index, example index)."""
        part = self.parts[i]
        stop = len(part) if stop is None else stop
        key = self.length_code[part].astype(np.int64) * len(self.draws) + part  # distinct keys
        if 0 < start or stop < len(part):
            # Only the slice: partition it out (linear), then sort just its rows.
            kth = [k for k in (start, stop - 1) if 0 <= k < len(part)]
            chosen = np.argpartition(key, kth)[start:stop]
            chosen = chosen[np.argsort(key[chosen])]
        else:
            chosen = np.argsort(key)
        rows = part[chosen]
        return np.stack([self.draws[rows].astype(np.int64), self.examples[rows]], axis=1)

    def all_batches(self) -> np.ndarray:
        """``batch(i)`` for every batch, in consumption order, as one [batches, G, 2] array (int32
        where the example indices fit): two linear sorts of the whole pool, by length code (ties
        by position) and then, stably, by batch, instead of one comparison sort per batch."""
        batches = len(self.parts)
        batch_of = np.empty(len(self.draws), dtype=np.uint16 if batches <= 2**16 else np.int64)
        batch_of[np.concatenate(self.parts)] = np.repeat(np.arange(batches), self.global_batch)
        by_length = _stable_order(self.length_code, int(self.length_code.max()) + 1)
        order = by_length[_stable_order(batch_of[by_length], batches)].reshape(batches, -1)
        dtype = np.int32 if len(self.examples) == 0 or int(self.examples.max()) < 2**31 else np.int64
        rows = np.empty(order.shape + (2,), dtype=dtype)
        rows[..., 0] = self.draws[order]
        rows[..., 1] = self.examples[order]
        return rows


class _SharedPool:
    """A pool read from its file (data/shared_pools.py), or held as the rows its builder wrote:
    ``batch`` reads only the asked-for rows, already in length order."""

    def __init__(self, counts: list[int], rows: np.ndarray):
        self.counts, self.rows = counts, rows

    def batch(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows[i, start:stop].astype(np.int64)


class TrainStream:
    """Infinite iterator of this rank's training micro-batches (see the module docstring).

    ``segment_conditioning``: whether the model conditions packed segments, which decides
    ``data.packing: auto`` (the trainer passes it from the conditioning variant; the default,
    False, keeps ``auto`` unpacked for a caller that does not say).

    Tasks without a training split (AX-b, AX-g) are left out. ``skipped`` counts the rows
    dropped under ``on_bad_row: skip`` per task."""

    def __init__(
        self,
        cfg: DataConfig,
        tasks: Sequence[Task],
        tokenizer,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        accumulation: int = 1,
        segment_conditioning: bool = False,
        pool_dir: str | Path | None = None,
    ):
        """``pool_dir``: a directory every rank of the job sees (the trainer's
        ``<run.dir>/data_pools``); with more than one rank, each pool is then built by one rank
        and read from its file by the others (data/shared_pools.py). None: every rank builds
        every pool itself."""
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or accumulation < 1:
            raise ValueError(f"bad sharding: micro_batch_size={micro_batch_size} rank={rank} world_size={world_size} "
                             f"accumulation={accumulation}")
        if cfg.bucket_pool_batches < 1:
            raise ValueError(f"data.bucket_pool_batches must be at least 1, got {cfg.bucket_pool_batches}")
        self.tasks = [t for t in tasks if t.train_split is not None]
        if not self.tasks:
            raise DataError(f"none of the tasks {[t.name for t in tasks]} has a training split")
        self.splits = [load_split(t, t.train_split, cfg, tokenizer, training=True) for t in self.tasks]
        self.skipped = {t.name: s.skipped for t, s in zip(self.tasks, self.splits)}
        self.sizes = [len(s) for s in self.splits]
        self.rates = mixing_rates(cfg, [t.name for t in self.tasks], self.sizes)
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.global_batch_size = micro_batch_size * world_size * accumulation
        self.pool_batches = cfg.bucket_pool_batches
        self.batch_mixing = cfg.batch_mixing
        self.packing = resolve_packing(cfg.packing, world_size * accumulation, segment_conditioning)
        self.max_lengths = (cfg.max_input_length, cfg.max_target_length)
        self.seed = cfg.seed if seed is None else seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._task_ids = [t.task_id for t in self.tasks]
        self._task_id_array = np.asarray(self._task_ids, dtype=np.int64)
        self._example_base = np.cumsum([0] + self.sizes[:-1]).astype(np.int64)
        self._flat_inputs = _FlatIds(self.splits, "input_ids", "input_offsets")
        self._flat_targets = _FlatIds(self.splits, "target_ids", "target_offsets")
        self._name_keys = [zlib.crc32(t.name.encode()) for t in self.tasks]
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._pool_index = 0
        self._batch_in_pool = 0
        self._micro_step = 0
        self._offsets = [0] * len(self.tasks)
        self._pool: _Pool | _SharedPool | None = None
        self._next_pool: _Pool | _SharedPool | None = None  # pool _pool_index + 1, when built ahead
        self.pool_files: PoolFiles | None = None
        if pool_dir is not None and world_size > 1:
            self.pool_files = PoolFiles(pool_dir, rank, world_size, self._pools_to_keep(cfg.prefetch_batches))
        self._lengths_checksum: int | None = None

    def _pools_to_keep(self, prefetch_batches: int) -> int:
        """How many pools before the one being built a builder keeps the files of. A builder
        builds pool p once its producer is in pool p-1; a producer is at most
        ``prefetch_batches + 1`` micro-batches ahead of its consumer, and the ranks' consumers
        are within a step of each other (every step has collectives), so every rank has mapped
        the pools up to that many micro-steps back; the slack covers a rank falling behind."""
        micro_steps = prefetch_batches + 1 + 2 * self.accumulation + 16
        return 2 + -(-micro_steps // (self.pool_batches * self.accumulation))

    # ------------------------------------------------------------------ the global stream

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        # Read once into a local: a pool built in another thread (next_pool_builder) may clear
        # the cache between a membership test and a lookup.
        key = (k, epoch)
        permutation = self._perm_cache.get(key)
        if permutation is None:
            if len(self._perm_cache) > 4 * len(self.tasks):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, self._name_keys[k], epoch])
            permutation = self._perm_cache[key] = rng.permutation(self.sizes[k])
        return permutation

    def _examples(self, k: int, start: int, count: int) -> np.ndarray:
        """Example indices at positions ``start .. start+count-1`` of task k's sequence."""
        size = self.sizes[k]
        out = np.empty(count, dtype=np.int64)
        position = start
        while position < start + count:  # the positions are contiguous: one slice per epoch
            epoch, within = divmod(position, size)
            take = min(size - within, start + count - position)
            out[position - start : position - start + take] = self._permutation(k, epoch)[within : within + take]
            position += take
        return out

    def _make_pool(self, pool_index: int, offsets: Sequence[int], global_batch: int, pool_batches: int) -> _Pool:
        """Pool ``pool_index`` cut into global batches of ``global_batch`` (module docstring).

        Works in task-major order (each task's draws in pool order, task after task), where each
        task's examples are one contiguous slice of its sequence; lengths are small integers, so
        the orders are radix sorts of dense length codes, and stratified's quantiles, increasing
        within each task, are merged by a stable sort of already sorted runs."""
        size, num_tasks = global_batch * pool_batches, len(self.tasks)
        draws = _draw_tasks(np.random.default_rng([self.seed, pool_index, 0]), self.rates, size)
        counts = np.bincount(draws, minlength=num_tasks)
        by_task = _stable_order(draws, num_tasks)  # positions, task-major
        task_major = np.repeat(np.arange(num_tasks), counts)
        examples_tm = np.concatenate([self._examples(k, offsets[k], int(c)) for k, c in enumerate(counts)])
        flat = self._example_base[task_major] + examples_tm
        in_len, tgt_len = self._flat_inputs.lengths[flat], self._flat_targets.lengths[flat]
        # (input, target) length pairs, numbered densely in increasing order
        code = in_len * (int(tgt_len.max()) + 1) + tgt_len
        if int(code.max()) < 2**24:  # a table of the codes that occur
            present = np.zeros(int(code.max()) + 1, dtype=bool)
            present[code] = True
            dense = np.cumsum(present) - 1
            codes, code = int(dense[-1]) + 1, dense[code]
        else:
            unique, code = np.unique(code, return_inverse=True)
            codes = len(unique)
        code_tm = code.astype(np.uint16 if codes <= 2**16 else np.int64)
        examples = np.empty(size, dtype=np.int64)
        examples[by_task] = examples_tm
        length_code = np.empty(size, dtype=code_tm.dtype)
        length_code[by_task] = code_tm
        if self.batch_mixing == "stratified":
            # Each draw's midpoint length quantile among its task's draws (ties by position);
            # the pool is ordered by quantile, ties by task: within a task the quantiles
            # increase, so a stable sort of the task-major runs breaks ties by task.
            by_length = by_task[_stable_order(task_major * codes + code_tm, num_tasks * codes)]
            quantile = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
            order = by_length[np.argsort(quantile, kind="stable")]
        else:
            order = _stable_order(length_code, codes)
        parts = np.split(order, pool_batches)
        shuffle = np.random.default_rng([self.seed, pool_index, 1]).permutation(pool_batches)
        return _Pool(draws, examples, counts.tolist(), [parts[i] for i in shuffle], length_code, global_batch)

    def _pool_counts(self, pool_index: int, global_batch: int, pool_batches: int) -> list[int]:
        """How many examples of each task pool ``pool_index`` takes (its draws only, no sorting)."""
        draws = _draw_tasks(np.random.default_rng([self.seed, pool_index, 0]), self.rates, global_batch * pool_batches)
        return np.bincount(draws, minlength=len(self.tasks)).tolist()

    def _obtain_pool(self, pool_index: int, offsets: Sequence[int], global_batch: int,
                     pool_batches: int) -> _Pool | _SharedPool:
        """Pool ``pool_index``: built here, or with shared pool files built by its builder rank
        (which writes it, or reuses a valid file of the same key) and mapped by the others."""
        files = self.pool_files
        if files is None:
            return self._make_pool(pool_index, offsets, global_batch, pool_batches)
        if self._lengths_checksum is None:
            self._lengths_checksum = zlib.crc32(self._flat_targets.lengths.tobytes(),
                                                zlib.crc32(self._flat_inputs.lengths.tobytes()))
        key = pool_key(seed=self.seed, pool_index=pool_index, global_batch=global_batch, pool_batches=pool_batches,
                       batch_mixing=self.batch_mixing, offsets=offsets, tasks=[t.name for t in self.tasks],
                       sizes=self.sizes, rates=self.rates.tolist(), lengths_checksum=self._lengths_checksum)
        # On every pool, not only the ones it builds: a rank builds one pool in world_size.
        files.forget_old(pool_index)
        if files.builder_of(pool_index) != self.rank:
            return _SharedPool(*files.wait(pool_index, key, len(self.tasks)))
        found = files.load(pool_index, key, len(self.tasks))
        if found is not None:
            files.adopt(pool_index, files.path(pool_index, key))
            pool = _SharedPool(*found)
        else:
            built = self._make_pool(pool_index, offsets, global_batch, pool_batches)
            pool = _SharedPool(built.counts, built.all_batches())
            files.publish(pool_index, key, pool.rows, pool.counts)
        return pool

    def remove_pool_files(self) -> None:
        """Delete the shared pool files this rank built (the trainer calls it at a clean exit)."""
        if self.pool_files is not None:
            self.pool_files.remove_built()

    def _current(self) -> tuple[_Pool | _SharedPool, int]:
        """The pool and index of the global batch at the position."""
        if self._pool is None:
            self._pool = self._obtain_pool(self._pool_index, self._offsets, self.global_batch_size, self.pool_batches)
        return self._pool, self._batch_in_pool

    def _advance(self) -> tuple[_Pool | _SharedPool, int]:
        """The pool and index of the global batch at the position; moves the position past it."""
        pool, index = self._current()
        self._batch_in_pool += 1
        if self._batch_in_pool == self.pool_batches:
            self._offsets = [o + c for o, c in zip(self._offsets, pool.counts)]
            self._pool_index += 1
            self._batch_in_pool = 0
            self._pool, self._next_pool = self._next_pool, None
        return pool, index

    def needs_pool(self) -> bool:
        """Whether the next batch would build its pool first."""
        return self._pool is None

    def next_pool_builder(self):
        """A function building the pool after the current one, to run in another thread while
        this stream hands out the current pool's batches, or None when that pool is already
        built; ``install_pool`` takes its result. Pools are pure functions of the position, so
        the batches are the same whether or not this is used."""
        if self._next_pool is not None:
            return None
        pool, _ = self._current()
        index, global_batch, pool_batches = self._pool_index + 1, self.global_batch_size, self.pool_batches
        offsets = [o + c for o, c in zip(self._offsets, pool.counts)]
        return lambda: (index, self._obtain_pool(index, offsets, global_batch, pool_batches))

    def install_pool(self, built: tuple[int, _Pool]) -> None:
        """Take a pool built by ``next_pool_builder``'s function if the stream still needs it."""
        index, pool = built
        if index == self._pool_index and self._pool is None:
            self._pool = pool
        elif index == self._pool_index + 1 and self._next_pool is None:
            self._next_pool = pool

    def build_next_pool(self) -> None:
        """Build the pool after the current one now, in this thread."""
        builder = self.next_pool_builder()
        if builder is not None:
            self.install_pool(builder())

    def next_global_batch(self) -> np.ndarray:
        """The next global batch as a [G, 2] array of (task index, example index); advances."""
        if self._micro_step:
            raise RuntimeError(f"the stream is at micro-step {self._micro_step} of a global batch, not at its start")
        pool, index = self._advance()
        return pool.batch(index)

    def next_share(self) -> np.ndarray:
        """This rank's [micro_batch_size, 2] slice for the next micro-step; advances. Only the
        rank's own rows are sorted and gathered."""
        pool, index = self._current()
        start = (self._micro_step * self.world_size + self.rank) * self.micro_batch_size
        rows = pool.batch(index, start, start + self.micro_batch_size)
        self._micro_step += 1
        if self._micro_step == self.accumulation:
            self._micro_step = 0
            self._advance()
        return rows

    # ------------------------------------------------------------------ this rank's batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def rank_share(self, global_batch: np.ndarray, rank: int | None = None, micro_step: int = 0) -> np.ndarray:
        """Rank ``rank``'s (default: this rank's) contiguous slice of a length-ordered global
        batch at micro-step ``micro_step``."""
        rank = self.rank if rank is None else rank
        start = (micro_step * self.world_size + rank) * self.micro_batch_size
        return global_batch[start : start + self.micro_batch_size]

    def collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """``collate(self.splits, rows, ...)``, gathered from the flat arrays of all tasks; with
        ``data.packing``, the same examples packed (``packed_batch``)."""
        examples = self._example_base[rows[:, 0]] + rows[:, 1]
        if self.packing:
            flat_in, flat_tgt = self._flat_inputs, self._flat_targets
            return packed_batch(
                (flat_in.ids, flat_in.starts[examples], flat_in.lengths[examples]),
                (flat_tgt.ids, flat_tgt.starts[examples], flat_tgt.lengths[examples]),
                self._task_id_array[rows[:, 0]], self.pad_id, *self.max_lengths,
            )
        input_ids, real = self._flat_inputs.gather(examples, self.pad_id)
        labels, _ = self._flat_targets.gather(examples, LABEL_PAD)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "task_ids": torch.from_numpy(self._task_id_array[rows[:, 0]]),
        }

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.collate(self.next_share())

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON position in the global stream (see the module docstring)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "tasks": [t.name for t in self.tasks],
            "sizes": list(self.sizes),
            "rates": [float(r) for r in self.rates],
            "global_batch_size": self.global_batch_size,
            "pool_batches": self.pool_batches,
            "batch_mixing": self.batch_mixing,
            "pool": self._pool_index,
            "batch_in_pool": self._batch_in_pool,
            # examples of the current global batch already taken by all ranks (0 at a step
            # boundary): a position in the global stream, whatever the world size
            "examples_in_batch": self._micro_step * self.world_size * self.micro_batch_size,
            "offsets": list(self._offsets),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "tasks", "sizes"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume the data stream: {key} was {state[key]}, is now {mine[key]}")
        if not np.allclose(state["rates"], mine["rates"], rtol=0, atol=1e-12):
            raise ValueError(f"cannot resume the data stream: mixing rates were {state['rates']}, are {mine['rates']}")
        self._pool = self._next_pool = None
        self._offsets = [int(o) for o in state["offsets"]]
        self._pool_index = int(state["pool"])
        self._batch_in_pool = int(state["batch_in_pool"])
        self._micro_step = 0
        taken = int(state.get("examples_in_batch", 0))
        # States saved before batch_mixing existed were cut by length.
        saved_shape = (state["global_batch_size"], state["pool_batches"], state.get("batch_mixing", "length"))
        same_shape = saved_shape == (self.global_batch_size, self.pool_batches, self.batch_mixing)
        if taken:
            # Mid-step: continuable only if what was taken is whole micro-steps of this job.
            per_micro_step = self.world_size * self.micro_batch_size
            if same_shape and taken % per_micro_step == 0:
                self._micro_step = taken // per_micro_step
            else:
                same_shape = False
        if not same_shape and (self._batch_in_pool > 0 or taken > 0):
            counts = self._pool_counts(self._pool_index, state["global_batch_size"], state["pool_batches"])
            logger.warning(
                "data stream: global batch %d -> %d, pool %d -> %d batches, batch mixing %s -> %s: resuming "
                "at the next pool; %d batches of the interrupted pool are skipped",
                state["global_batch_size"], self.global_batch_size, state["pool_batches"], self.pool_batches,
                saved_shape[2], self.batch_mixing, state["pool_batches"] - self._batch_in_pool,
            )
            self._offsets = [o + c for o, c in zip(self._offsets, counts)]
            self._pool_index += 1
            self._batch_in_pool = 0
