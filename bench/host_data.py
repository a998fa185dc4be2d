"""The input pipeline's host side, side by side in one run: what a step still waits for, what a
rank's batches cost at 1 to 512 ranks, padding at one GPU, tokenisation against the Rust
tokenizer, collation and the tokenizer fingerprint.

    python -m bench.host_data [--rounds 3] [--examples 4000] [--baseline-rev f981c88]
                              [--previous-rev 476fb41] [--sections critical,pool,...] [--out PATH]

Every timed comparison runs its variants in the same process, interleaved (the order rotated
every round), and reports medians; the load average is recorded before and after. The data are
bench/batching.py's eight GLUE-like tasks (equal rates, 16 per micro-batch, default mixing).

* ``critical path``: per simulated world size W (rank W-1 of W), ``--steps`` steps of a loop
  whose step is a host wait of ``--step-ms`` (2.08 ms: a t5-large step at the GLUE shape on an
  H100 at 40% MFU, during which a GPU-bound host waits), the batch drawn either inline (as the
  trainer did before data/prefetch.py) or from the Prefetcher; the wall time per step spent
  getting the batch (the trainer's ``data_wait_ms``; the batch is freed after the step, outside
  it) is the data time left on the critical path. Steady state: the first batch
  (the first pool's construction, paid once before step 1) is not counted; ``--steps`` spans
  two pools, so the inline variant pays its share of pool construction. ``prefetch, previous``
  is ``--previous-rev``'s Prefetcher over its own stream.
* ``pool cost``: per W = 1, 8, 64, 512 simulated ranks, the CPU time per step a rank spends in
  ``next(stream)`` over one whole pool: this tree with the pools shared through files (one rank
  builds each pool, the others map it; the mean over sampled ranks, each rank's share of the
  builds included) and built by every rank (``data.share_pools: off``), with each variant's CPU
  time of building one pool (a builder rank's spike, in its pool thread), by
  bench.batching.shared_pool_cost; and ``--baseline-rev``'s and ``--previous-rev``'s streams on
  rank W-1 (bench.batching.pool_cost). The load average is recorded per world size.
* ``real tokens``: bench.batching.measure at 1 rank, 1 rank with 8 accumulation micro-steps, 8 ranks
  (its four modes, ``packed`` included).
* ``tokenisation``: token ids of GLUE-like texts, in tokens per CPU-second of the process with
  ``TOKENIZERS_PARALLELISM=false`` (one tokenizer thread): the Rust ``encode_batch`` alone, this
  tree's ``_ragged`` (encode_batch and the flat arrays), and the ``transformers`` call with the
  flattening the code before did.
* ``collate``: one micro-batch, the vectorised ``collate`` against the baseline's row by row.
* ``fingerprint``: ``tokenizer_fingerprint`` memoised against computed afresh.

The baseline and previous trees' modules are loaded from git (``git show
REV:hp_deepspeed/data/stream.py``, ``.../prefetch.py``); without git or that commit those
comparisons are left out. ``--sections`` runs only the named parts (critical, pool, tokens,
collate, tokenise, fingerprint).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.batching import GLUE_LIKE, WORDS, measure, pool_cost, shared_pool_cost, tasks_in, write_tasks
from bench.common import machine, median, table, write_json
from hp_deepspeed.data import DataConfig, TrainStream, build_tasks, load_tokenizer
from hp_deepspeed.data import tokenization
from hp_deepspeed.data.prefetch import Prefetcher
from hp_deepspeed.data.stream import collate

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str, path: str, name: str):
    """The file ``path`` as of git ``rev``, imported as module ``name`` (None if unavailable)."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def baseline_stream_module(rev: str):
    """hp_deepspeed/data/stream.py as of ``rev``, imported under another name (None if unavailable)."""
    return module_at(rev, "hp_deepspeed/data/stream.py", "baseline_stream")


def rotated(names: list[str], r: int) -> list[str]:
    return names[r % len(names):] + names[:r % len(names)]


def critical_path(folder: Path, cache: str, world_sizes, steps: int, step_ms: float, rounds: int, baseline,
                  previous=None) -> list[dict]:
    cfg = DataConfig(custom_tasks=tasks_in(folder), cache_dir=cache)
    tasks, tokenizer = build_tasks(cfg), load_tokenizer(None)
    step_s = step_ms / 1e3

    def run(kind: str, world: int) -> float:
        cls = {"inline, baseline": baseline and baseline.TrainStream,
               "prefetch, previous": previous and previous[0].TrainStream}.get(kind, TrainStream)
        stream = cls(cfg, tasks, tokenizer, 16, rank=world - 1, world_size=world)
        prefetcher = {"prefetch": Prefetcher, "prefetch, previous": previous and previous[1].Prefetcher}.get(kind)
        batches = prefetcher(stream, "cpu", cfg.prefetch_batches) if prefetcher else stream
        waited = 0.0
        try:
            next(batches)  # start-up (the first pool; the trainer pays it once, before step 1)
            for _ in range(steps):
                started = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - started
                time.sleep(step_s)  # the step: the host waits for the GPU
                # The step's batch is freed when the step ends, as in the trainer, not while
                # the next one is awaited (freeing four CPU tensors costs ~15 us here).
                del batch
        finally:
            if prefetcher:
                batches.close()
        return waited / steps * 1e3

    kinds = ["inline", "prefetch"] + (["prefetch, previous"] if previous else []) + (
        ["inline, baseline"] if baseline else [])
    rows = []
    for world in world_sizes:
        times = {k: [] for k in kinds}
        for r in range(rounds):
            for kind in rotated(kinds, r):
                times[kind].append(run(kind, world))
        rows.append({"ranks": world, **{f"{k} ms": median(v) for k, v in times.items()}, "rounds": times})
    return rows


def pool_costs(folder: Path, cache: str, world_sizes, rounds: int, baseline, previous=None) -> list[dict]:
    """Per world size, interleaved: this tree with pools shared through files and built by every
    rank (bench.batching.shared_pool_cost: mean per-rank cost per step, and one build), and the
    older trees' cost on rank W-1 (bench.batching.pool_cost)."""
    variants = {"shared": True, "unshared": False}
    if previous:
        variants["previous"] = previous[0].TrainStream
    if baseline:
        variants["baseline"] = baseline.TrainStream
    rows = []
    for world in world_sizes:
        times = {k: [] for k in variants}
        builds = {"shared": [], "unshared": []}
        for r in range(rounds if world < 512 else max(1, rounds - 1)):
            for name in rotated(list(variants), r):
                if name in builds:
                    cost = shared_pool_cost(world, variants[name], folder=folder, cache_dir=cache)
                    times[name].append(cost["per_rank_ms"])
                    builds[name].append(cost["build_ms"])
                else:
                    times[name].append(pool_cost(world, stream_class=variants[name], folder=folder, cache_dir=cache))
        rows.append({"ranks": world, **{f"{k}, per rank ms": median(v) for k, v in times.items()},
                     **{f"{k}, one build ms": median(v) for k, v in builds.items()},
                     "rounds": times, "build_rounds": builds, "loadavg": list(os.getloadavg())})
    return rows


def glue_like_texts(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    names = list(GLUE_LIKE)
    texts = []
    for i in range(count):
        name = names[i % len(names)]
        words = max(2, round(rng.lognormvariate(0, 0.45) * GLUE_LIKE[name][0]))
        texts.append(f"{name} sentence: " + " ".join(rng.choice(WORDS) for _ in range(words)))
    return texts


def tokenisation(texts: list[str], rounds: int) -> dict:
    tokenizer = load_tokenizer(None)
    backend = tokenizer.backend_tokenizer
    chunk = tokenization._TOKENIZE_CHUNK

    def rust():
        backend.enable_truncation(512)
        out = []
        for start in range(0, len(texts), chunk):
            out += [e.ids for e in backend.encode_batch(texts[start:start + chunk])]
        backend.no_truncation()
        return sum(map(len, out))

    def ours():
        return len(tokenization._ragged(tokenizer, texts, 512)[0])

    def transformers_call():
        ids = []
        for start in range(0, len(texts), chunk):
            ids += tokenizer(texts[start:start + chunk], truncation=True, max_length=512)["input_ids"]
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=sum(map(len, ids)))
        return len(flat)

    variants = {"encode_batch (Rust)": rust, "_ragged (this tree)": ours, "transformers call + flatten": transformers_call}
    cpu = {k: [] for k in variants}
    wall = {k: [] for k in variants}
    tokens = {}
    for r in range(rounds):
        for name in rotated(list(variants), r):
            c, w = time.process_time(), time.perf_counter()
            tokens[name] = variants[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    assert len(set(tokens.values())) == 1, tokens  # every variant produced the same number of ids
    n = tokens["encode_batch (Rust)"]
    rates = {k: n / median(v) for k, v in cpu.items()}
    return {"texts": len(texts), "tokens": n, "tokens_per_cpu_s": rates,
            "tokens_per_wall_s": {k: n / median(v) for k, v in wall.items()},
            "ratio_to_encode_batch": {k: v / rates["encode_batch (Rust)"] for k, v in rates.items()},
            "rounds_cpu_s": cpu}


def collation(folder: Path, cache: str, rounds: int, baseline, repeats: int = 200) -> dict:
    cfg = DataConfig(custom_tasks=tasks_in(folder), cache_dir=cache)
    stream = TrainStream(cfg, build_tasks(cfg), load_tokenizer(None), 16, rank=3, world_size=8)
    shares = [stream.rank_share(stream.next_global_batch()) for _ in range(repeats)]
    variants = {"vectorised (this tree)": lambda s: collate(stream.splits, s, stream._task_ids, stream.pad_id)}
    if baseline:
        variants["row by row (baseline)"] = lambda s: baseline.collate(
            stream.splits, [(int(k), int(i)) for k, i in s], stream._task_ids, stream.pad_id)
    times = {k: [] for k in variants}
    for r in range(rounds):
        for name in rotated(list(variants), r):
            started = time.thread_time()
            for share in shares:
                variants[name](share)
            times[name].append((time.thread_time() - started) / repeats * 1e3)
    return {k: median(v) for k, v in times.items()}


def fingerprint(rounds: int, repeats: int = 20) -> dict:
    tokenizer = load_tokenizer(None)
    out = {}
    for name, fn in (("computed", tokenization._fingerprint), ("memoised", tokenization.tokenizer_fingerprint)):
        times = []
        for _ in range(rounds):
            started = time.thread_time()
            for _ in range(repeats):
                fn(tokenizer)
            times.append((time.thread_time() - started) / repeats * 1e3)
        out[name] = median(times)
    return out


SECTIONS = ("critical", "pool", "tokens", "collate", "tokenise", "fingerprint")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4000, help="examples per GLUE-like task")
    parser.add_argument("--steps", type=int, default=400, help="steps per critical-path run (2 pools)")
    parser.add_argument("--step-ms", type=float, default=2.08)
    parser.add_argument("--critical-ranks", default="1,8,64")
    parser.add_argument("--pool-ranks", default="1,8,64,512")
    parser.add_argument("--texts", type=int, default=32000)
    parser.add_argument("--baseline-rev", default="f981c88")
    parser.add_argument("--previous-rev", default="476fb41",
                        help="the tree before the hand-over and pool changes ('' to leave it out)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", default="host_data")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}, expected some of {list(SECTIONS)}")
    # One tokenizer thread: CPU-seconds of Rust's thread pool on a shared machine include its
    # threads' spinning, which varies with the load more than the tokenisation does.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    baseline = baseline_stream_module(args.baseline_rev) if args.baseline_rev else None
    previous = None
    if args.previous_rev:
        modules = (module_at(args.previous_rev, "hp_deepspeed/data/stream.py", "previous_stream"),
                   module_at(args.previous_rev, "hp_deepspeed/data/prefetch.py", "previous_prefetch"))
        previous = modules if all(modules) else None
    before = machine()
    result = {"benchmark": "host_data", "baseline_rev": args.baseline_rev if baseline else None,
              "previous_rev": args.previous_rev if previous else None,
              "step_ms": args.step_ms, "rounds": args.rounds, "loadavg_before": before["loadavg_1_5_15"],
              "command": "python -m bench.host_data " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "data", str(Path(tmp) / "cache")
        write_tasks(folder, args.examples, seed=0)
        if "critical" in sections:
            ranks = [int(w) for w in args.critical_ranks.split(",")]
            result["critical_path"] = critical_path(folder, cache, ranks, args.steps, args.step_ms, args.rounds,
                                                    baseline, previous)
            print(table(["ranks"] + [k for k in result["critical_path"][0] if k.endswith(" ms")],
                        [[r["ranks"]] + [r[k] for k in r if k.endswith(" ms")] for r in result["critical_path"]]))
            result["loadavg_after_critical"] = list(os.getloadavg())
        if "pool" in sections:
            ranks = [int(w) for w in args.pool_ranks.split(",")]
            result["pool_cost"] = pool_costs(folder, cache, ranks, args.rounds, baseline, previous)
            print(table(["ranks"] + [k for k in result["pool_cost"][0] if k.endswith(" ms")] + ["load"],
                        [[r["ranks"]] + [r[k] for k in r if k.endswith(" ms")] + [r["loadavg"][0]]
                         for r in result["pool_cost"]]))
        if "tokens" in sections:
            result["real_tokens"] = {}
            for label, ranks_, accumulation in (("1 rank", 1, 1), ("1 rank x 8 micro-steps", 1, 8), ("8 ranks", 8, 1)):
                m = measure(examples=args.examples, micro_batch_size=16, ranks=ranks_, batches=200, cache_dir=cache,
                            accumulation=accumulation)
                result["real_tokens"][label] = {mode: m[mode] for mode in ("random", "length", "stratified", "packed")}
            print(table(["real tokens (share x rate)", "random", "length", "stratified", "stratified, packed"],
                        [[label] + [f"{v[m]['real_token_fraction']:.3f} ({v[m]['largest_share_over_rate']:.2f}x)"
                                    for m in ("random", "length", "stratified", "packed")]
                         for label, v in result["real_tokens"].items()]))
        if "collate" in sections:
            result["collate_ms"] = collation(folder, cache, args.rounds, baseline)
            print(table(["collate, one micro-batch of 16", "ms"], list(result["collate_ms"].items())))
    if "tokenise" in sections:
        result["tokenisation"] = tokenisation(glue_like_texts(args.texts), args.rounds)
        t = result["tokenisation"]
        print(table(["tokenisation", "tokens / CPU-s", "x encode_batch", "tokens / wall-s"],
                    [[k, v, t["ratio_to_encode_batch"][k], t["tokens_per_wall_s"][k]]
                     for k, v in t["tokens_per_cpu_s"].items()]))
    if "fingerprint" in sections:
        result["fingerprint_ms"] = fingerprint(args.rounds)
        print(table(["tokenizer_fingerprint", "ms"], list(result["fingerprint_ms"].items())))
    result["loadavg_after"] = list(os.getloadavg())
    print(f"load average before {result['loadavg_before']}, after {[round(x, 2) for x in result['loadavg_after']]}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
