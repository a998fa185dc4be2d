"""Checkpoint save and resume throughput against ``dd`` on the same disk with the same writers
and readers (ZeRO-3, real engines, CheckpointManager).

    python -m bench.checkpoint_io [--presets tiny-v1_0 t5-small] [--saves 3] [--loads 2]
                                  [--ranks 2] [--writer-mb 512] [--out PATH]
                                  [--cold-only] [--quiet-below 1.5 [--quiet-wait 300]]
    python -m bench.checkpoint_io --t5-base [--ranks 1]     # the 2.7 GB case, on its own

``--ranks`` gloo ranks, fp32, ZeRO-3 (``ds_configs/zero3_cpu_test.json`` via ``build_ds_config``,
torch AdamW), HyperPrompt-Global on each preset, random initialisation from the preset's config
(no hub). Per preset, fresh rank processes build an engine, take one training step (so Adam's
moments exist) and save ``--saves`` checkpoints with ``CheckpointManager.save``: the whole
protocol (DeepSpeed shards through the ledger: fsync and xxh3-128 per file, RNG files, the
gathered reports, manifest, COMPLETE, rename, ``latest``, retention with ``keep_last=1`` in the
background). Before each save, every rank runs one ``dd if=/dev/zero bs=16M conv=fsync`` writing
as many bytes as it wrote in the previous save, at the same time as the other ranks: the disk's
speed with the same number of writers, measured in the same minute as the save it is compared
with (interleaved rounds).

Then ``--loads`` rounds, each a cold and a warm resume (``--cold-only``: cold only), every one in
fresh rank processes with a pristine engine: every rank reads its files of the newest checkpoint
with ``dd of=/dev/null bs=16M`` (all ranks at once: the same number of readers), again with
``DD_STREAMS`` ``dd`` per file, each on its own contiguous part (as many streams per reader as the
resume keeps requests in flight, ``preload.DIRECT_READERS``: what the disk gives a reader with that
much parallelism, printed beside the single stream so that a ratio can be told apart from it),
and the resume is timed in its two parts (the three in an order rotated every round),
``find_resume_point`` (every rank reads its share of the files into memory, hashing them as they
are read, and checks them against the manifest: the resume's only read of the disk) and
``CheckpointManager.load`` (DeepSpeed loads from that verified copy). Cold: the page cache is
dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, root only) before each of the three; where
that is not allowed the run says so and the "cold" rows are warm. Warm: the files are in the page
cache for both. Times are rank 0's wall clock between barriers; the load average is recorded
around every timed phase, and every round prints its line (load, both ``dd``, the resume, the
ratios), the medians at the end; ``--quiet-below L`` starts each resume round only once the
1-minute load average is under L (or ``--quiet-wait`` seconds have passed). One engine per
process keeps t5-base within a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cpu_zero3_engine, median, table, write_json
from hp_deepspeed.checkpointing.preload import DIRECT_READERS

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8
DD_BLOCK = 16 << 20
DEFAULT_PRESETS = ("tiny-v1_0", "t5-small")
# Free space a t5-base run needs: two checkpoints (retention keeps one while the next is written)
# and dd's file of one rank's share, 2.7 GB each, with room to spare.
T5_BASE_FREE_BYTES = 12 * 10**9
DD_STREAMS = DIRECT_READERS


def _own_files(step_dir: Path, rank: int) -> list[tuple[Path, int]]:
    """The files ``rank`` wrote into ``step_dir`` and their sizes, from its manifest."""
    files = json.loads((step_dir / "manifest.json").read_text())["files"]
    return [(step_dir / rel, entry["size"]) for rel, entry in files.items() if entry["rank"] == rank]


def _dd_write(path: Path, size: int) -> None:
    count = max(1, -(-size // DD_BLOCK))
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)


def _dd_read(paths: list[Path], streams: int = 1) -> None:
    """Read ``paths`` one after the other with ``dd``; ``streams`` > 1: each file as that many
    contiguous parts read at once by as many ``dd`` processes."""
    for path in paths:
        if streams == 1:
            subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}"], check=True, capture_output=True)
            continue
        blocks = -(-path.stat().st_size // DD_BLOCK)
        per = max(1, -(-blocks // streams))
        parts = [subprocess.Popen(["dd", f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}", f"skip={i * per}",
                                   f"count={per}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in range(streams) if i * per < blocks]
        for part in parts:
            _, err = part.communicate()
            if part.returncode:
                raise subprocess.CalledProcessError(part.returncode, part.args, stderr=err)


def drop_caches() -> str | None:
    """Empty the page cache (the whole machine's); None when done, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError as err:
        return f"/proc/sys/vm/drop_caches: {os.strerror(err.errno)}"
    return None


def rank_body(preset: str, phase: str, saves: int, root: str, first: int = 0) -> dict:
    """``phase`` "save": one training step, then ``saves`` rounds of (dd write, timed save);
    "load-cold" / "load-warm": dd read of this rank's files with one stream and with several, and a
    timed resume (verification, load), in an order rotated by ``first``, the page cache dropped
    before each in "load-cold"."""
    import torch.distributed as dist

    from hp_deepspeed.checkpointing import CheckpointManager
    from hp_deepspeed.checkpointing.config import CheckpointConfig
    from hp_deepspeed.launching import collectives

    engine, t5_config = cpu_zero3_engine(preset, NUM_TASKS)
    rank = dist.get_rank()
    manager = CheckpointManager(CheckpointConfig(interval=1, keep_last=1, resume="auto"), Path(root) / preset,
                                model_config={"preset": preset})

    def timed_collective(fn) -> float:
        collectives.barrier()
        start = time.perf_counter()
        fn()
        collectives.barrier()
        return time.perf_counter() - start

    if phase == "save":
        engine.train()
        ids = torch.randint(2, t5_config.vocab_size, (1, 16))
        engine.backward(engine(input_ids=ids, labels=ids, task_ids=torch.zeros(1, dtype=torch.long)).loss)
        engine.step()
        dd_file = Path(root) / f"dd-rank{rank}"
        saves_s, dd_s = [], []
        path = manager.save(engine, 1, {"bench": True})  # sizes the first dd round; not timed
        for step in range(2, saves + 2):
            share = sum(size for _, size in _own_files(path, rank))
            dd_s.append(timed_collective(lambda: _dd_write(dd_file, share)))
            dd_file.unlink()
            saves_s.append(timed_collective(lambda: manager.save(engine, step, {"bench": True})))
            path = Path(root) / preset / "checkpoints" / f"step-{step}"
        manager.finish_deletions()
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        # dd wrote whole 16 MiB blocks: its byte count, for its throughput
        dd_bytes = collectives.all_reduce(torch.tensor([float(max(1, -(-sum(s for _, s in _own_files(path, rank))
                                                                         // DD_BLOCK)) * DD_BLOCK)])).item()
        return {"save_s_all": saves_s, "dd_write_s_all": dd_s, "checkpoint_bytes": disk, "dd_bytes": dd_bytes,
                "params": sum(int(p.ds_numel) for p in engine.module.parameters())}
    cold = phase == "load-cold"
    not_cold = None

    def maybe_drop() -> None:
        nonlocal not_cold
        if cold and rank == 0:
            not_cold = drop_caches() or not_cold
        collectives.barrier()

    step_dir = max((Path(root) / preset / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    own = [p for p, _ in _own_files(step_dir, rank)]
    loads = [os.getloadavg()[0]]
    times: dict[str, float] = {}
    point = None

    def find():
        nonlocal point
        point = manager.find_resume_point()

    def resume() -> None:
        times["verify_s"] = timed_collective(find)
        times["load_s"] = timed_collective(lambda: manager.load(engine, point))

    def dd(key: str, streams: int) -> None:
        times[key] = timed_collective(lambda: _dd_read(own, streams))

    ways = [("dd_read_s", lambda: dd("dd_read_s", 1)), ("dd_read_n_s", lambda: dd("dd_read_n_s", DD_STREAMS)),
            ("resume", resume)]
    if not cold:
        _dd_read(own)  # the files in the page cache, whichever reader comes first
    # Rotated by round, so that no reader always runs first (or last) after the others.
    ways = ways[first % len(ways):] + ways[:first % len(ways)]
    for _, way in ways:
        maybe_drop()
        way()
        loads.append(os.getloadavg()[0])
    return {**times, "order": [name for name, _ in ways], "cold": cold and not_cold is None,
            "not_cold_because": not_cold, "loadavg_1min": loads}


def writer_cost(mb: int = 512, rounds: int = 3, folder: str | None = None) -> dict:
    """One process, one file of ``mb`` MB of fp32 tensors, fsynced, in interleaved rounds: torch.save
    to a path with torch's CRC32 (what DeepSpeed does alone), the same without CRC32, and the
    ledger's write (CRC32 off, xxh3-128 of every byte as it goes out); then reading the file back
    plainly against ``digest_file`` (the resume's verification)."""
    import os

    from hp_deepspeed.checkpointing.integrity import SaveLedger, digest_file

    state = {f"t{i}": torch.randn(mb * 2**20 // 4 // 8) for i in range(8)}
    size = sum(t.numel() * 4 for t in state.values())

    def torch_save(crc: bool, path: Path) -> None:
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(state, path)
        finally:
            torch.serialization.set_crc32_options(True)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def read(path: Path) -> None:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass

    with tempfile.TemporaryDirectory(prefix="hp-bench-writer-", dir=folder) as tmp:
        path = Path(tmp) / "state.pt"
        ways = {"torch.save (CRC32 on)": lambda: torch_save(True, path),
                "torch.save (CRC32 off)": lambda: torch_save(False, path),
                "ledger (CRC32 off, xxh3-128)": lambda: SaveLedger(tmp, 0).torch_save(state, path),
                "read back (page cache)": lambda: read(path),
                "digest_file (page cache)": lambda: digest_file(path)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rows = {name: {"gb_per_s": size / median(ts) / 1e9, "s_all": ts} for name, ts in times.items()}
    print(table(["path", "GB/s (median)", "seconds per round"],
                [[name, r["gb_per_s"], ", ".join(f"{t:.2f}" for t in r["s_all"])] for name, r in rows.items()]))
    return {"bytes": size, "rounds": rounds, "ways": rows}


def _load_rows(loads_r: list[dict], size: int) -> dict:
    """Throughputs of one cache state's resumes, and resume / dd per round (the same processes)."""
    resume = [x["verify_s"] + x["load_s"] for x in loads_r]
    several = [x for x in loads_r if "dd_read_n_s" in x]  # rounds of runs before dd with several streams lack it
    by_several = [x["dd_read_n_s"] / (x["verify_s"] + x["load_s"]) for x in several]
    return {
        "rounds": loads_r,
        "resume_s_median": median(resume),
        "dd_read_s_median": median([x["dd_read_s"] for x in loads_r]),
        "dd_read_n_s_median": median([x["dd_read_n_s"] for x in several]) if several else None,
        "resume_over_dd_n_per_round": by_several,
        "resume_over_dd_n_median": median(by_several) if several else None,
        "dd_read_gb_per_s": size / median([x["dd_read_s"] for x in loads_r]) / 1e9,
        "resume_gb_per_s": size / median(resume) / 1e9,
        "verify_gb_per_s": size / median([x["verify_s"] for x in loads_r]) / 1e9,
        "load_only_gb_per_s": size / median([x["load_s"] for x in loads_r]) / 1e9,
        "resume_over_dd_per_round": [x["dd_read_s"] / r for x, r in zip(loads_r, resume)],
        "resume_over_dd_median": median([x["dd_read_s"] / r for x, r in zip(loads_r, resume)]),
        "load_only_over_dd_median": median([x["dd_read_s"] / x["load_s"] for x in loads_r]),
        "loadavg_1min": [min(v for x in loads_r for v in x["loadavg_1min"]),
                         max(v for x in loads_r for v in x["loadavg_1min"])],
        "cold": all(x["cold"] for x in loads_r),
    }


def model_row(saved: dict, by_cache: dict[str, list[dict]]) -> dict:
    """One preset's result: the save phase's ``rank_body`` result and the resumes by cache state
    ("cold", "warm"), turned into throughputs and ratios against ``dd`` (what ``bench.report`` reads)."""
    size = saved["checkpoint_bytes"]
    save_ratio = [(size / s) / (saved["dd_bytes"] / d) for s, d in zip(saved["save_s_all"], saved["dd_write_s_all"])]
    return {
        **saved, "save_s_median": median(saved["save_s_all"]),
        "save_gb_per_s": size / median(saved["save_s_all"]) / 1e9,
        "dd_write_gb_per_s": saved["dd_bytes"] / median(saved["dd_write_s_all"]) / 1e9,
        "save_over_dd_per_round": save_ratio, "save_over_dd_median": median(save_ratio),
        "load_s_median": median([x["verify_s"] + x["load_s"] for x in by_cache["cold"]]),
        **{cache: _load_rows(loads_r, size) for cache, loads_r in by_cache.items()},
    }


def wait_for_quiet(below: float | None, patience_s: float) -> float:
    """Wait until the 1-minute load average is under ``below`` (at most ``patience_s`` seconds);
    returns the load average the round starts at. On a shared machine the rounds that start when
    the others are idle say most about the code; the load is recorded either way."""
    start = time.monotonic()
    while below is not None and os.getloadavg()[0] >= below and time.monotonic() - start < patience_s:
        time.sleep(5)
    return os.getloadavg()[0]


def round_lines(preset: str, cache: str, c: dict, first_round: int = 1) -> str:
    """One line per resume round: the load, ``dd`` with one stream and with ``DD_STREAMS``, the
    resume, and the resume against each; then the medians."""
    rows = []
    for i, x in enumerate(c["rounds"], first_round):
        resume = x["verify_s"] + x["load_s"]
        several = x.get("dd_read_n_s")
        rows.append([f"{preset} {cache} {i}", f"{x['loadavg_1min'][0]:.1f}-{max(x['loadavg_1min']):.1f}",
                     x["dd_read_s"], "-" if several is None else several, f"{x['verify_s']:.2f} + {x['load_s']:.2f}",
                     x["dd_read_s"] / resume, "-" if several is None else several / resume])
    several = c["dd_read_n_s_median"]
    rows.append([f"{preset} {cache} median", f"{c['loadavg_1min'][0]:.1f}-{c['loadavg_1min'][1]:.1f}",
                 c["dd_read_s_median"], "-" if several is None else several, f"{c['resume_s_median']:.2f}",
                 c["resume_over_dd_median"], "-" if several is None else c["resume_over_dd_n_median"]])
    return table(["round", "load avg (1 min)", "dd 1 stream s", f"dd {DD_STREAMS} streams s", "verify + load s",
                  "resume / dd 1", f"resume / dd {DD_STREAMS}"], rows)


def run(presets=DEFAULT_PRESETS, saves=3, loads=2, ranks=2, out="checkpoint_io", writer_mb=512,
        timeout=1800, cold_only=False, quiet_below: float | None = None, quiet_wait_s: float = 300) -> dict:
    from hp_deepspeed.testing.ranks import run_ranks

    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    if "t5-base" in presets:
        free = shutil.disk_usage(results).free
        if free < T5_BASE_FREE_BYTES:
            raise SystemExit(f"{results}: {free / 1e9:.1f} GB free, a t5-base checkpoint run needs "
                             f"{T5_BASE_FREE_BYTES / 1e9:.0f} GB (two checkpoints and dd's file)")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="hp-bench-ckpt-", dir=str(results)) as root:
        for preset in presets:
            # Fresh rank processes for the saves and for every load: one pristine engine per process.
            r = run_ranks("bench.checkpoint_io:rank_body", ranks, timeout=timeout, args=(preset, "save", saves, root))[0]
            by_cache: dict[str, list[dict]] = {"cold": []} if cold_only else {"cold": [], "warm": []}
            for i in range(loads):  # interleaved: a cold and a warm resume per round
                for cache in by_cache:
                    wait_for_quiet(quiet_below, quiet_wait_s)
                    by_cache[cache].append(run_ranks("bench.checkpoint_io:rank_body", ranks, timeout=timeout,
                                                     args=(preset, f"load-{cache}", 0, root, i))[0])
                    print(round_lines(preset, cache, _load_rows(by_cache[cache][-1:], 1), i + 1).splitlines()[2],
                          flush=True)
            rows[preset] = model_row(r, by_cache)
    not_cold = {x["not_cold_because"] for r in rows.values() for x in r["cold"]["rounds"] if x["not_cold_because"]}
    if not_cold:
        print("the page cache could not be dropped (" + "; ".join(sorted(not_cold)) + "): the 'cold' rows are warm")
    print(table(["preset", "params (M)", "checkpoint MB", "save GB/s", "dd write GB/s", "save/dd (median of rounds)"],
                [[p, r["params"] / 1e6, r["checkpoint_bytes"] / 1e6, r["save_gb_per_s"], r["dd_write_gb_per_s"],
                  r["save_over_dd_median"]] for p, r in rows.items()]))
    print(table(["preset", "cache", "resume GB/s (verify+load)", "verify GB/s", "load only GB/s", "dd read GB/s",
                 "resume/dd per round", "load only/dd", "load avg (1 min)"],
                [[p, cache, c["resume_gb_per_s"], c["verify_gb_per_s"], c["load_only_gb_per_s"], c["dd_read_gb_per_s"],
                  ", ".join(f"{x:.2f}" for x in c["resume_over_dd_per_round"]), c["load_only_over_dd_median"],
                  f"{c['loadavg_1min'][0]:.1f}-{c['loadavg_1min'][1]:.1f}"]
                 for p, r in rows.items() for cache in ("cold", "warm") if cache in r for c in (r[cache],)]))
    for p, r in rows.items():
        for cache in ("cold", "warm"):
            if cache in r:
                print(round_lines(p, cache, r[cache]))
    result = {"benchmark": "checkpoint_io", "ranks": ranks, "zero_stage": 3, "precision": "fp32",
              "variant": "hyperprompt_global", "saves": saves, "loads": loads, "cold_only": cold_only,
              "dd_streams": DD_STREAMS,
              "quiet_below": quiet_below, "models": rows,
              "writer": writer_cost(writer_mb, folder=str(results)) if writer_mb else None}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    parser.add_argument("--t5-base", action="store_true",
                        help="measure t5-base alone (2.7 GB checkpoint; needs 12 GB free; deleted afterwards): "
                             "--presets t5-base --ranks 1 --saves 2 --writer-mb 0 unless given")
    parser.add_argument("--saves", type=int)
    parser.add_argument("--loads", type=int, default=2)
    parser.add_argument("--ranks", type=int)
    parser.add_argument("--writer-mb", type=int,
                        help="size of the one-process serialisation comparison (0: skip it; default 512)")
    parser.add_argument("--out")
    parser.add_argument("--cold-only", action="store_true", help="cold resume rounds only (no warm ones)")
    parser.add_argument("--quiet-below", type=float,
                        help="before each resume round, wait until the 1-minute load average is under this "
                             "(at most --quiet-wait seconds; the load is recorded either way)")
    parser.add_argument("--quiet-wait", type=float, default=300)
    args = parser.parse_args(argv)
    if args.t5_base:
        presets, saves, ranks, writer_mb, out = ["t5-base"], 2, 1, 0, "checkpoint_io_t5_base"
    else:
        presets, saves, ranks, writer_mb, out = args.presets, 3, 2, 512, "checkpoint_io"
    run(presets, args.saves or saves, args.loads, args.ranks or ranks, args.out or out,
        writer_mb=writer_mb if args.writer_mb is None else args.writer_mb, cold_only=args.cold_only,
        quiet_below=args.quiet_below, quiet_wait_s=args.quiet_wait)


if __name__ == "__main__":
    main()
