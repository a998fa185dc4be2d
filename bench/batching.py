"""Padding efficiency of length-bucketed batches against random batches on a GLUE-like mix.

    python -m bench.batching [--examples 4000] [--micro-batch-size 32] [--batches 200] [--out bench_batching.json]

Builds eight custom tasks whose input lengths follow the GLUE/SuperGLUE training sets (mean
words per input, log-normal spread: CoLA ~9, SST-2 ~10, QQP ~23, MNLI ~33, QNLI ~37,
MRPC ~43, RTE ~55, BoolQ ~110) and their label words as targets, writes them as JSON lines,
and draws batches from the real ``TrainStream`` (bundled tokenizer, examples-proportional
mixture) with ``bucket_pool_batches=1`` (random batches) and with bucketing. The fraction of
real tokens is ``(attention-mask ones + non -100 labels) / (input_ids + labels elements)``.
Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from hp_deepspeed.data.config import CustomTaskConfig, DataConfig
from hp_deepspeed.data.stream import LABEL_PAD, TrainStream
from hp_deepspeed.data.tasks import build_tasks
from hp_deepspeed.data.tokenization import load_tokenizer

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


def real_fraction(stream: TrainStream, batches: int) -> float:
    real = total = 0
    for _ in range(batches):
        batch = next(stream)
        real += int(batch["attention_mask"].sum()) + int((batch["labels"] != LABEL_PAD).sum())
        total += batch["input_ids"].numel() + batch["labels"].numel()
    return real / total


def measure(examples: int = 4000, micro_batch_size: int = 32, batches: int = 200,
            pool_batches: int = DataConfig.bucket_pool_batches,
            seed: int = 0, cache_dir: str | None = None) -> dict:
    """Real-token fractions of random and bucketed batches (see the module docstring)."""
    tokenizer = load_tokenizer(None)
    with tempfile.TemporaryDirectory() as tmp:
        custom = write_tasks(Path(tmp) / "data", examples, seed)
        result = {"examples_per_task": examples, "micro_batch_size": micro_batch_size, "batches": batches}
        for label, pool in (("random", 1), ("bucketed", pool_batches)):
            cfg = DataConfig(custom_tasks=custom, bucket_pool_batches=pool, seed=seed,
                             cache_dir=cache_dir or str(Path(tmp) / "cache"))
            stream = TrainStream(cfg, build_tasks(cfg), tokenizer, micro_batch_size)
            result[f"{label}_real_token_fraction"] = real_fraction(stream, batches)
        result["bucket_pool_batches"] = pool_batches
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4000, help="examples per task")
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--pool-batches", type=int, default=DataConfig.bucket_pool_batches)
    parser.add_argument("--out", type=Path, default=Path("bench_batching.json"))
    args = parser.parse_args(argv)
    result = measure(args.examples, args.micro_batch_size, args.batches, args.pool_batches)
    print(f"{'batching':<10} real-token fraction")
    for label in ("random", "bucketed"):
        print(f"{label:<10} {result[f'{label}_real_token_fraction']:.3f}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
