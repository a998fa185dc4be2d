"""What packing does to a training step at one GPU without accumulation: the same micro-batches,
one row per example against packed (``data.packing``), forward and backward timed side by side.

    python -m bench.packing_step [--preset t5-small] [--variant hyperprompt_global] [--batches 12]
                                 [--rounds 3] [--threads 2] [--out bench_packing_step.json]

bench/batching.py counts real tokens; this times what a step costs with each layout, since packed
rows are longer (attention grows with the row) while the padding they drop is mostly
feed-forward work. Data: bench/batching.py's eight GLUE-like tasks at equal rates, 16 examples
per micro-batch, default mixing; the micro-batches are one rank's shares of the real
``TrainStream``, each collated both ways. Model: the preset's architecture with random weights,
fp32 on the CPU, the conditioning variant given (training mode, dropout off). Each round times
every micro-batch both ways, the order alternating per batch and per round; the first batch of
each layout is a warm-up and not timed. Prints per layout the median ms per micro-batch, the
real tokens per second, and the packed/unpacked ratio of the medians; writes JSON with every
timing and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.batching import write_tasks
from hp_deepspeed.data.config import DataConfig
from hp_deepspeed.data.stream import LABEL_PAD, TrainStream
from hp_deepspeed.data.tasks import build_tasks
from hp_deepspeed.data.tokenization import load_tokenizer
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.conditioning import ConditioningConfig
from hp_deepspeed.model.hyperprompt_t5 import build_model


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())


def measure(preset: str = "t5-small", variant: str = "hyperprompt_global", batches: int = 12, rounds: int = 3,
            examples: int = 2000, micro_batch_size: int = 16, seed: int = 0, cache_dir: str | None = None) -> dict:
    tokenizer = load_tokenizer(None)
    with tempfile.TemporaryDirectory() as tmp:
        custom = write_tasks(Path(tmp) / "data", examples, seed)
        cfg = DataConfig(custom_tasks=custom, packing=False, seed=seed, cache_dir=cache_dir or str(Path(tmp) / "cache"))
        plain = TrainStream(cfg, build_tasks(cfg), tokenizer, micro_batch_size)
        packed = TrainStream(DataConfig(**{**cfg.__dict__, "packing": True}), plain.tasks, tokenizer, micro_batch_size,
                             segment_conditioning=True)
        shares = [plain.next_share() for _ in range(batches + 1)]
        layouts = {"unpacked": [plain.collate(rows) for rows in shares], "packed": [packed.collate(rows) for rows in shares]}
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name_or_path=preset, load_weights=False, seed=seed, dropout_rate=0.0),
                        ConditioningConfig(variant=variant), num_tasks=len(plain.tasks))
    model.train()

    def step(batch: dict) -> float:
        started = time.perf_counter()
        model(**batch).loss.backward()
        elapsed = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return elapsed

    for name in layouts:  # warm-up: the allocator and the first kernels
        step(layouts[name][0])
    times: dict[str, list[float]] = {name: [] for name in layouts}
    load_before = os.getloadavg()
    for round_ in range(rounds):
        for i in range(1, batches + 1):
            order = ("unpacked", "packed") if (round_ + i) % 2 == 0 else ("packed", "unpacked")
            for name in order:
                times[name].append(step(layouts[name][i]))
    load_after = os.getloadavg()
    tokens = sum(real_tokens(b) for b in layouts["unpacked"][1:])
    if tokens != sum(real_tokens(b) for b in layouts["packed"][1:]):
        raise AssertionError("the packed micro-batches do not hold the unpacked ones' tokens")
    result = {"preset": preset, "variant": variant, "batches": batches, "rounds": rounds,
              "micro_batch_size": micro_batch_size, "threads": torch.get_num_threads(),
              "load_before": load_before, "load_after": load_after, "times_s": times}
    for name, batches_of in layouts.items():
        median = statistics.median(times[name])
        shapes = [tuple(b["input_ids"].shape) for b in batches_of[1:]]
        result[name] = {"median_ms": 1000 * median,
                        "real_tokens_per_s": tokens / sum(times[name]) * rounds,
                        "rows": statistics.mean(s[0] for s in shapes), "input_width": statistics.mean(s[1] for s in shapes)}
    result["packed_over_unpacked"] = result["packed"]["median_ms"] / result["unpacked"]["median_ms"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--variant", default=ConditioningConfig.variant)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_packing_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.preset, args.variant, args.batches, args.rounds)
    print(f"{args.preset}, {args.variant}, fp32 CPU, {result['threads']} threads, {args.batches} micro-batches of "
          f"{result['micro_batch_size']} x {args.rounds} rounds; load {result['load_before'][0]:.1f} -> "
          f"{result['load_after'][0]:.1f}")
    for name in ("unpacked", "packed"):
        r = result[name]
        print(f"{name:<9} rows {r['rows']:5.1f}  width {r['input_width']:6.1f}  forward+backward {r['median_ms']:8.1f} ms "
              f"(median)  {r['real_tokens_per_s']:9.0f} real tokens/s")
    print(f"packed / unpacked: {result['packed_over_unpacked']:.2f}x the step time")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
