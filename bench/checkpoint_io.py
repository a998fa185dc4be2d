"""Checkpoint save and resume throughput against ``dd`` on the same disk with the same writers
(ZeRO-3, real engines, CheckpointManager).

    python -m bench.checkpoint_io [--presets tiny-v1_0 t5-small t5-base] [--saves 3] [--loads 2]
                                  [--ranks 2] [--out PATH]

``--ranks`` gloo ranks, fp32, ZeRO-3 (``ds_configs/zero3_cpu_test.json`` via ``build_ds_config``,
torch AdamW), HyperPrompt-Global on each preset, random initialisation. Per preset, fresh rank
processes build an engine, take one training step (so Adam's moments exist) and save ``--saves``
checkpoints with ``CheckpointManager.save``: the whole protocol (DeepSpeed shards through the
ledger: fsync and xxh3-128 per file, RNG files, the gathered reports, manifest, COMPLETE, rename,
``latest``, retention with ``keep_last=1`` in the background). Before each save, every rank runs
one ``dd if=/dev/zero bs=16M conv=fsync`` writing as many bytes as it wrote in the previous save,
at the same time as the other ranks: the disk's speed with the same number of writers, measured
in the same minute as the save it is compared with (interleaved rounds).

Then ``--loads`` times, fresh rank processes build a pristine engine; each rank first reads its
files of the newest checkpoint with ``dd of=/dev/null bs=16M``, then the resume is timed in its
two parts: ``find_resume_point`` (every rank checks its share of the files against the manifest)
and ``CheckpointManager.load``. The files were just written, so reads come mostly from the page
cache for dd and the resume alike: this compares the code paths, not cold-disk bandwidth.
Times are rank 0's wall clock between barriers. One engine per process keeps t5-base within a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median, table, write_json

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8
DD_BLOCK = 16 << 20


def _own_files(step_dir: Path, rank: int) -> list[tuple[Path, int]]:
    """The files ``rank`` wrote into ``step_dir`` and their sizes, from its manifest."""
    files = json.loads((step_dir / "manifest.json").read_text())["files"]
    return [(step_dir / rel, entry["size"]) for rel, entry in files.items() if entry["rank"] == rank]


def _dd_write(path: Path, size: int) -> None:
    count = max(1, -(-size // DD_BLOCK))
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)


def _dd_read(paths: list[Path]) -> None:
    for path in paths:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}"], check=True, capture_output=True)


def rank_body(preset: str, phase: str, saves: int, root: str) -> dict:
    """``phase`` "save": one training step, then ``saves`` rounds of (dd write, timed save);
    "load": dd read of this rank's files, then a timed resume (verification, load)."""
    import deepspeed
    import torch.distributed as dist

    from hp_deepspeed.checkpointing import CheckpointManager
    from hp_deepspeed.checkpointing.config import CheckpointConfig
    from hp_deepspeed.launching import collectives
    from hp_deepspeed.model.builder import ModelConfig, resolve_t5_config
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
    from hp_deepspeed.training.optim import OptimConfig

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model_cfg = ModelConfig(name_or_path=preset, load_weights=False)
    t5_config = resolve_t5_config(model_cfg)
    ds_config = build_ds_config(
        read_ds_config(REPO / "ds_configs" / "zero3_cpu_test.json"), micro_batch_size=1,
        gradient_accumulation=1, world_size=dist.get_world_size(), optim=OptimConfig(),
        d_model=t5_config.d_model, log_every=1000, on_cpu=True)
    model = build_model(model_cfg, ConditioningConfig(variant="hyperprompt_global"), NUM_TASKS, ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
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
    step_dir = max((Path(root) / preset / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    dd_read = timed_collective(lambda: _dd_read([p for p, _ in _own_files(step_dir, rank)]))
    point = None

    def find():
        nonlocal point
        point = manager.find_resume_point()

    verify_s = timed_collective(find)
    load_s = timed_collective(lambda: manager.load(engine, point))
    return {"dd_read_s": dd_read, "verify_s": verify_s, "load_s": load_s}


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


def run(presets=("tiny-v1_0", "t5-small", "t5-base"), saves=3, loads=2, ranks=2, out="checkpoint_io",
        timeout=1800) -> dict:
    from hp_deepspeed.testing.ranks import run_ranks

    rows = {}
    with tempfile.TemporaryDirectory(prefix="hp-bench-ckpt-", dir=str(REPO / "bench" / "results")) as root:
        for preset in presets:
            # Fresh rank processes for the saves and for every load: one engine per process.
            r = run_ranks("bench.checkpoint_io:rank_body", ranks, timeout=timeout, args=(preset, "save", saves, root))[0]
            loads_r = [run_ranks("bench.checkpoint_io:rank_body", ranks, timeout=timeout,
                                 args=(preset, "load", 0, root))[0] for _ in range(loads)]
            size = r["checkpoint_bytes"]
            save_ratio = [(size / s) / (r["dd_bytes"] / d) for s, d in zip(r["save_s_all"], r["dd_write_s_all"])]
            rows[preset] = {
                **r, "loads": loads_r, "save_s_median": median(r["save_s_all"]),
                "load_s_median": median([x["verify_s"] + x["load_s"] for x in loads_r]),
                "save_gb_per_s": size / median(r["save_s_all"]) / 1e9,
                "dd_write_gb_per_s": r["dd_bytes"] / median(r["dd_write_s_all"]) / 1e9,
                "save_over_dd_per_round": save_ratio, "save_over_dd_median": median(save_ratio),
                "resume_gb_per_s": size / median([x["verify_s"] + x["load_s"] for x in loads_r]) / 1e9,
                "load_only_gb_per_s": size / median([x["load_s"] for x in loads_r]) / 1e9,
                "dd_read_gb_per_s": size / median([x["dd_read_s"] for x in loads_r]) / 1e9,
            }
    print(table(["preset", "params (M)", "checkpoint MB", "save GB/s", "dd write GB/s", "save/dd (median of rounds)",
                 "resume GB/s (verify+load)", "load only GB/s", "dd read GB/s"],
                [[p, r["params"] / 1e6, r["checkpoint_bytes"] / 1e6, r["save_gb_per_s"], r["dd_write_gb_per_s"],
                  r["save_over_dd_median"], r["resume_gb_per_s"], r["load_only_gb_per_s"], r["dd_read_gb_per_s"]]
                 for p, r in rows.items()]))
    result = {"benchmark": "checkpoint_io", "ranks": ranks, "zero_stage": 3, "precision": "fp32",
              "variant": "hyperprompt_global", "saves": saves, "loads": loads, "models": rows,
              "writer": writer_cost(writer_mb, folder=str(REPO / "bench" / "results")) if writer_mb else None}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-v1_0", "t5-small", "t5-base"])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--loads", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--writer-mb", type=int, default=512,
                        help="size of the one-process serialisation comparison (0: skip it)")
    parser.add_argument("--out", default="checkpoint_io")
    args = parser.parse_args(argv)
    run(args.presets, args.saves, args.loads, args.ranks, args.out, writer_mb=args.writer_mb)


if __name__ == "__main__":
    main()
