"""Padding against mixing: real-token fraction and per-batch task share of the batching modes;
the per-rank cost of drawing a rank's batches at 1 to 512 simulated ranks.

    python -m bench.batching [--examples 4000] [--micro-batch-size 16] [--ranks 8] [--accumulation 1]
                             [--batches 200] [--collate-rounds 5] [--pool-cost-ranks 1,8,64,512]
                             [--out bench_batching.json]

Builds eight custom tasks whose input lengths follow the GLUE/SuperGLUE training sets (mean
words per input, log-normal spread: CoLA ~9, SST-2 ~10, QQP ~23, MNLI ~33, QNLI ~37,
MRPC ~43, RTE ~55, BoolQ ~110) and their label words as targets, all of the same size (equal
mixing rates), writes them as JSON lines, and draws global batches of ``micro-batch-size x
ranks x accumulation`` (default 16 x 8 x 1 = 128) from the real ``TrainStream`` (bundled
tokenizer) in these modes:

* ``random``: ``bucket_pool_batches=1`` with ``batch_mixing=length`` (no bucketing at all);
* ``length``: the pool sorted by length and cut (``batch_mixing=length``);
* ``stratified``: the default mixing (``batch_mixing=stratified``), one row per example;
* ``default``: what a job gets without settings: ``stratified`` with ``data.packing: auto``,
  which packs when a step is one micro-batch (one rank, no accumulation);
* ``packed``: the default's batches (the same draws) with ``data.packing``: each micro-batch's
  examples end to end in as few rows as fit.

For each it reports the fraction of real tokens in the micro-batches the ranks actually get
(every rank, every micro-step),
``(attention-mask ones + non -100 labels) / (input_ids + labels elements)``, the share of
the largest task in each global batch, as a mean over batches and as a multiple of that task's
mixing rate (1.0 = the batch follows the mixture exactly), the wall time of collating one
micro-batch (``TrainStream.collate``, mean; packing's layout search included), and per
micro-batch the rows, the input width and rows x width^2 (the encoder self-attention's score
cells, which packing's longer rows could raise). At one rank with
accumulation 1 the global batch is one micro-batch that must hold every task at its rate, so
unpacked it pads to the longest task's lengths; with accumulation the micro-steps are cut as
ranks are.

``--collate-rounds N``: the cost of packing, side by side: the same micro-batches (one rank,
default mixing) collated unpacked and packed, alternately, N rounds over ``--batches``
micro-batches; the median wall ms per micro-batch of each.

``--pool-cost-ranks``: per simulated world size W (default mixing), the CPU time
(``time.thread_time``) per step that ``next(stream)`` costs a rank over one whole pool
(``bucket_pool_batches`` steps, its share of pool construction included), with the pools shared
through files and with every rank building every pool (``shared_pool_cost``), and the CPU time
of building one pool in each. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from hp_deepspeed.data.config import CustomTaskConfig, DataConfig
from hp_deepspeed.data.stream import LABEL_PAD, TrainStream
from hp_deepspeed.data.tasks import build_tasks
from hp_deepspeed.data.tokenization import load_tokenizer
from hp_deepspeed.model.conditioning import PER_EXAMPLE_VARIANTS, ConditioningConfig

# name -> (mean words per input, label words)
GLUE_LIKE = {
    "cola": (9, ["unacceptable", "acceptable"]),
    "sst2": (10, ["negative", "positive"]),
    "qqp": (23, ["not_duplicate", "duplicate"]),
    "mnli": (33, ["entailment", "neutral", "contradiction"]),
    "qnli": (37, ["entailment", "not_entailment"]),
    "mrpc": (43, ["not_equivalent", "equivalent"]),
    "rte": (55, ["entailment", "not_entailment"]),
    "boolq": (110, ["False", "True"]),
}
WORDS = "the a of river castle teacher found painted quiet bright village market garden old".split()
# mode -> (bucket_pool_batches or None for the default, batch_mixing, packing)
MODES = {"random": (1, "length", False), "length": (None, "length", False),
         "stratified": (None, "stratified", False), "packed": (None, "stratified", True),
         "default": (None, DataConfig.batch_mixing, DataConfig.packing)}
# The default variant (HyperPrompt-Global) conditions packed segments, so ``auto`` may pack.
DEFAULT_VARIANT_PACKS = ConditioningConfig.variant not in PER_EXAMPLE_VARIANTS
# The targets the default must meet.
MIN_REAL_TOKENS, MAX_SHARE_RATIO = 0.90, 1.25


def write_tasks(folder: Path, examples: int, seed: int) -> list[CustomTaskConfig]:
    rng = random.Random(seed)
    tasks = []
    for name, (mean_words, label_words) in GLUE_LIKE.items():
        rows = []
        for _ in range(examples):
            n = max(2, round(rng.lognormvariate(0, 0.45) * mean_words))
            rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(n)), "label": rng.randrange(len(label_words))})
        path = folder / name / "train.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append(
            CustomTaskConfig(
                name=f"bench/{name}", input_template=f"{name} sentence: {{text}}", path=str(path.parent),
                label_words=label_words, eval_splits=[],
            )
        )
    return tasks


def batch_stats(stream: TrainStream, ranks: int, batches: int, accumulation: int = 1) -> dict:
    """Real-token fraction over the ranks' micro-batches; largest task share per global batch."""
    real = total = 0
    shares, ratios = [], []
    collate_s, collated = 0.0, 0
    rows = width = attention = 0
    for _ in range(batches):
        global_batch = stream.next_global_batch()
        for micro_step in range(accumulation):
            for rank in range(ranks):
                items = stream.rank_share(global_batch, rank, micro_step)
                started = time.perf_counter()
                batch = stream.collate(items)
                collate_s += time.perf_counter() - started
                collated += 1
                rows += batch["input_ids"].shape[0]
                width += batch["input_ids"].shape[1]
                attention += batch["input_ids"].shape[0] * batch["input_ids"].shape[1] ** 2
                real += int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())
                total += batch["input_ids"].numel() + batch["labels"].numel()
        share = np.bincount(global_batch[:, 0], minlength=len(stream.rates)) / len(global_batch)
        shares.append(share.max())
        ratios.append((share / stream.rates).max())
    return {"real_token_fraction": real / total, "largest_task_share": float(np.mean(shares)),
            "largest_share_over_rate": float(np.mean(ratios)), "mixing_rate": float(stream.rates.max()),
            "collate_ms": collate_s / collated * 1e3, "rows": rows / collated, "input_width": width / collated,
            "encoder_attention_cells": attention / collated}


def measure(examples: int = 4000, micro_batch_size: int = 16, ranks: int = 8, batches: int = 200,
            pool_batches: int = DataConfig.bucket_pool_batches, seed: int = 0, cache_dir: str | None = None,
            accumulation: int = 1, modes: tuple[str, ...] = tuple(MODES)) -> dict:
    """Per mode of ``modes`` (see the module docstring): real-token fraction, largest task share
    and collation time."""
    tokenizer = load_tokenizer(None)
    result = {"examples_per_task": examples, "micro_batch_size": micro_batch_size, "ranks": ranks,
              "accumulation": accumulation, "global_batch": micro_batch_size * ranks * accumulation,
              "batches": batches, "bucket_pool_batches": pool_batches}
    with tempfile.TemporaryDirectory() as tmp:
        custom = write_tasks(Path(tmp) / "data", examples, seed)
        for mode in modes:
            pool, mixing, packing = MODES[mode]
            cfg = DataConfig(custom_tasks=custom, bucket_pool_batches=pool or pool_batches, batch_mixing=mixing,
                             packing=packing, seed=seed, cache_dir=cache_dir or str(Path(tmp) / "cache"))
            stream = TrainStream(cfg, build_tasks(cfg), tokenizer, micro_batch_size, rank=0, world_size=ranks,
                                 accumulation=accumulation, segment_conditioning=DEFAULT_VARIANT_PACKS)
            result[mode] = batch_stats(stream, ranks, batches, accumulation)
    if "default" in result:
        default = result["default"]
        result["default_meets_targets"] = (default["real_token_fraction"] >= MIN_REAL_TOKENS
                                           and default["largest_share_over_rate"] <= MAX_SHARE_RATIO)
    return result


def collate_cost(examples: int = 4000, micro_batch_size: int = 16, batches: int = 200, rounds: int = 5,
                 seed: int = 0, cache_dir: str | None = None) -> dict:
    """Median wall ms per micro-batch of ``TrainStream.collate`` unpacked and packed, on the same
    micro-batches (one rank, default mixing), interleaved: each micro-batch is collated both
    ways, in alternating order, ``rounds`` times."""
    with tempfile.TemporaryDirectory() as tmp:
        custom = write_tasks(Path(tmp) / "data", examples, seed)
        streams = {}
        for packing in (False, True):
            cfg = DataConfig(custom_tasks=custom, packing=packing, seed=seed,
                             cache_dir=cache_dir or str(Path(tmp) / "cache"))
            streams[packing] = TrainStream(cfg, build_tasks(cfg), load_tokenizer(None), micro_batch_size)
        shares = [streams[False].next_share() for _ in range(batches)]
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(rounds):
            for i, rows in enumerate(shares):
                for packing in ((False, True) if (round_ + i) % 2 == 0 else (True, False)):
                    started = time.perf_counter()
                    streams[packing].collate(rows)
                    times[packing].append(time.perf_counter() - started)
    return {"unpacked_ms": float(np.median(times[False])) * 1e3, "packed_ms": float(np.median(times[True])) * 1e3,
            "micro_batches": batches, "rounds": rounds}


def pool_cost(ranks: int, examples: int = 4000, micro_batch_size: int = 16, pool_batches: int = 200, seed: int = 0,
              cache_dir: str | None = None, stream_class=TrainStream, folder: Path | None = None) -> float:
    """CPU milliseconds per step that rank ``ranks - 1`` of ``ranks`` spends in ``next(stream)``,
    over one whole pool (see the module docstring). ``stream_class``: another implementation
    with TrainStream's constructor, for side-by-side runs."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or Path(tmp) / "data"
        custom = write_tasks(folder, examples, seed) if not folder.exists() else tasks_in(folder)
        cfg = DataConfig(custom_tasks=custom, bucket_pool_batches=pool_batches, seed=seed,
                         cache_dir=cache_dir or str(Path(tmp) / "cache"))
        stream = stream_class(cfg, build_tasks(cfg), load_tokenizer(None), micro_batch_size, rank=ranks - 1,
                              world_size=ranks)
        started = time.thread_time()
        for _ in range(pool_batches):
            next(stream)
        return (time.thread_time() - started) / pool_batches * 1e3


def shared_pool_cost(ranks: int, shared: bool, examples: int = 4000, micro_batch_size: int = 16,
                     pool_batches: int = 200, seed: int = 0, cache_dir: str | None = None,
                     folder: Path | None = None) -> dict:
    """The per-rank CPU cost of the stream at ``ranks`` simulated ranks, pools shared through
    files (``shared``, data/shared_pools.py) or built by every rank, over pool 1 (pool 0 is
    start-up). Streams of a few sampled ranks (0, 1, ranks // 2, ranks - 1) in one process over
    one directory; pool 1's builder (rank 1) builds it ahead with ``build_next_pool``, as its
    pool thread would, and that call's CPU time is ``build_ms``, the spike one builder takes.
    ``slices_ms``: mean over the sampled ranks of the CPU time per step of ``next(stream)`` over
    pool 1 (mapping the file and reading its rows, or building the pool inline, and collating).
    ``per_rank_ms``: what a rank pays per step on average: shared, ``slices_ms`` plus its share
    of the builds (one pool in ``ranks``: ``build_ms / (ranks * pool_batches)``); not shared,
    every rank builds every pool."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or Path(tmp) / "data"
        custom = write_tasks(folder, examples, seed) if not folder.exists() else tasks_in(folder)
        cfg = DataConfig(custom_tasks=custom, bucket_pool_batches=pool_batches, seed=seed,
                         cache_dir=cache_dir or str(Path(tmp) / "cache"))
        tasks, tokenizer = build_tasks(cfg), load_tokenizer(None)
        sampled = sorted({0, 1 % ranks, ranks // 2, ranks - 1})
        pool_dir = Path(tmp) / "pools" if shared else None
        streams = {r: TrainStream(cfg, tasks, tokenizer, micro_batch_size, rank=r, world_size=ranks, pool_dir=pool_dir)
                   for r in sampled}
        builder = streams[1 % ranks]
        for step in range(pool_batches):  # pool 0, rank 0 (its builder) first
            if step == pool_batches - 1:
                started = time.thread_time()
                builder.build_next_pool()
                build_ms = (time.thread_time() - started) * 1e3
            for r in sampled:
                next(streams[r])
        spent = dict.fromkeys(sampled, 0.0)
        for _ in range(pool_batches):  # pool 1
            for r in sampled:
                started = time.thread_time()
                next(streams[r])
                spent[r] += time.thread_time() - started
        slices_ms = float(np.mean([spent[r] for r in sampled])) / pool_batches * 1e3
        if shared:
            per_rank_ms = slices_ms + build_ms / (ranks * pool_batches)
        else:  # the builder above built pool 1 ahead; the other ranks built it inline
            per_rank_ms = float(np.mean([spent[r] * 1e3 + (build_ms if streams[r] is builder else 0.0)
                                         for r in sampled])) / pool_batches
        for stream in streams.values():
            stream.remove_pool_files()
        return {"per_rank_ms": per_rank_ms, "build_ms": build_ms, "slices_ms": slices_ms, "sampled_ranks": sampled}


def tasks_in(folder: Path) -> list[CustomTaskConfig]:
    """The task configs of a folder written by ``write_tasks``."""
    return [CustomTaskConfig(name=f"bench/{name}", input_template=f"{name} sentence: {{text}}",
                             path=str(folder / name), label_words=label_words, eval_splits=[])
            for name, (_, label_words) in GLUE_LIKE.items()]


def format_table(result: dict) -> str:
    lines = [f"global batch {result['global_batch']} = {result['micro_batch_size']} x {result['ranks']} ranks x "
             f"{result['accumulation']} micro-steps, {len(GLUE_LIKE)} GLUE-like tasks at equal rates, "
             f"{result['batches']} batches",
             f"{'mode':<11} {'real tokens':>11} {'largest task share':>19} {'x its rate':>10} {'collate ms':>10} "
             f"{'rows':>5} {'width':>6} {'attn cells':>10}"]
    for mode in (m for m in MODES if m in result):
        r = result[mode]
        lines.append(f"{mode:<11} {r['real_token_fraction']:>11.3f} {r['largest_task_share']:>19.3f} "
                     f"{r['largest_share_over_rate']:>10.2f} {r['collate_ms']:>10.3f} {r['rows']:>5.1f} "
                     f"{r['input_width']:>6.1f} {r['encoder_attention_cells']:>10.0f}")
    if "default_meets_targets" in result:
        lines.append(f"default ({DataConfig.batch_mixing}, packing {DataConfig.packing}) meets >= {MIN_REAL_TOKENS:.2f} real tokens and <= "
                     f"{MAX_SHARE_RATIO}x rate: {result['default_meets_targets']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4000, help="examples per task")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=8, help="ranks sharing a global batch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-steps per global batch")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--collate-rounds", type=int, default=0, help="rounds of the packed/unpacked collate timing")
    parser.add_argument("--pool-cost-ranks", default="", help="comma-separated world sizes, e.g. 1,8,64,512")
    parser.add_argument("--pool-batches", type=int, default=DataConfig.bucket_pool_batches)
    parser.add_argument("--out", type=Path, default=Path("bench_batching.json"))
    args = parser.parse_args(argv)
    result = measure(args.examples, args.micro_batch_size, args.ranks, args.batches, args.pool_batches,
                     accumulation=args.accumulation)
    print(format_table(result))
    if args.collate_rounds:
        cost = result["collate_cost"] = collate_cost(args.examples, args.micro_batch_size, args.batches,
                                                      args.collate_rounds)
        print(f"collate one micro-batch of {args.micro_batch_size} (median wall ms, {cost['rounds']} interleaved "
              f"rounds of {cost['micro_batches']}): unpacked {cost['unpacked_ms']:.3f}, packed {cost['packed_ms']:.3f}")
    if args.pool_cost_ranks:
        costs = {int(w): {name: shared_pool_cost(int(w), shared, args.examples, args.micro_batch_size, args.pool_batches)
                          for name, shared in (("shared", True), ("unshared", False))}
                 for w in args.pool_cost_ranks.split(",")}
        result["pool_cost_ms_per_step"] = costs
        for w, c in costs.items():
            print(f"{w} ranks: CPU ms per step per rank, pools shared {c['shared']['per_rank_ms']:.3f} (one build "
                  f"{c['shared']['build_ms']:.1f}), built by every rank {c['unshared']['per_rank_ms']:.3f} (one build "
                  f"{c['unshared']['build_ms']:.1f})")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
