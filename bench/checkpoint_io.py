"""Checkpoint save and resume time against model size (ZeRO-3, real engines, CheckpointManager).

    python -m bench.checkpoint_io [--presets tiny-v1_0 t5-small t5-base] [--saves 3] [--loads 2]
                                  [--ranks 2] [--out PATH]

``--ranks`` gloo ranks, fp32, ZeRO-3 (``ds_configs/zero3_cpu_test.json`` via ``build_ds_config``,
torch AdamW), HyperPrompt-Global on each preset, random initialisation. Per preset, fresh
rank processes build an engine, take one training step (so Adam's moments exist) and save
``--saves`` checkpoints (steps 1, 2, ...) with ``hp_deepspeed.checkpointing.CheckpointManager.save``:
the whole protocol (DeepSpeed shards, RNG files, fsync, the all-reduced success flag, COMPLETE
marker, rename, ``latest``, retention with ``keep_last=1``). Then ``--loads`` times, fresh rank
processes build a pristine engine and time ``CheckpointManager.load`` of the newest checkpoint
(``find_resume_point`` is cheap and not timed). One engine per process keeps t5-base within a
shared 24 GiB machine. Times are rank 0's wall clock between barriers; the loads read files
just written, so mostly from the page cache: this measures serialisation, not the disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median, table, write_json

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8


def rank_body(preset: str, phase: str, saves: int, root: str) -> dict:
    """``phase`` "save": one training step, then ``saves`` timed saves; "load": one timed load."""
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
    times = []
    if phase == "save":
        engine.train()
        ids = torch.randint(2, t5_config.vocab_size, (1, 16))
        engine.backward(engine(input_ids=ids, labels=ids, task_ids=torch.zeros(1, dtype=torch.long)).loss)
        engine.step()
        for step in range(1, saves + 1):
            collectives.barrier()
            start = time.perf_counter()
            path = manager.save(engine, step, {"bench": True})
            collectives.barrier()
            times.append(time.perf_counter() - start)
        disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return {"save_s_all": times, "checkpoint_bytes": disk,
                "params": sum(int(p.ds_numel) for p in engine.module.parameters())}
    point = manager.find_resume_point()
    collectives.barrier()
    start = time.perf_counter()
    manager.load(engine, point)
    collectives.barrier()
    return {"load_s": time.perf_counter() - start}


def run(presets=("tiny-v1_0", "t5-small", "t5-base"), saves=3, loads=2, ranks=2, out="checkpoint_io",
        timeout=1800) -> dict:
    from hp_deepspeed.testing.distributed import run_ranks

    rows = {}
    with tempfile.TemporaryDirectory(prefix="hp-bench-ckpt-") as root:
        for preset in presets:
            # Fresh rank processes for the saves and for every load: one engine per process.
            r = run_ranks("bench.checkpoint_io:rank_body", ranks, timeout=timeout, args=(preset, "save", saves, root))[0]
            r["load_s_all"] = [run_ranks("bench.checkpoint_io:rank_body", ranks, timeout=timeout,
                                         args=(preset, "load", 0, root))[0]["load_s"] for _ in range(loads)]
            save, load = median(r["save_s_all"]), median(r["load_s_all"])
            rows[preset] = {**r, "save_s_median": save, "load_s_median": load,
                            "save_mb_per_s": r["checkpoint_bytes"] / save / 1e6,
                            "load_mb_per_s": r["checkpoint_bytes"] / load / 1e6}
    print(table(["preset", "params (M)", "checkpoint MB", "save s (median)", "load s (median)", "save MB/s",
                 "load MB/s"],
                [[p, r["params"] / 1e6, r["checkpoint_bytes"] / 1e6, r["save_s_median"], r["load_s_median"],
                  r["save_mb_per_s"], r["load_mb_per_s"]] for p, r in rows.items()]))
    result = {"benchmark": "checkpoint_io", "ranks": ranks, "zero_stage": 3, "precision": "fp32",
              "variant": "hyperprompt_global", "saves": saves, "loads": loads, "models": rows}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-v1_0", "t5-small", "t5-base"])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--loads", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="checkpoint_io")
    args = parser.parse_args(argv)
    run(args.presets, args.saves, args.loads, args.ranks, args.out)


if __name__ == "__main__":
    main()
