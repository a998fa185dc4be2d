"""How long a checkpoint save blocks the training loop: synchronous against asynchronous save.

    python -m bench.checkpoint_stall [--preset t5-small] [--ranks 1 2] [--rounds 3] [--steps 3]
                                     [--out PATH]

Per world size, fresh gloo rank processes build one ZeRO-3 fp32 engine (``--preset``, random
initialisation, HyperPrompt-Global, torch AdamW, as ``bench.checkpoint_io``), take one training
step so Adam's moments exist, and hold two ``CheckpointManager``s on two folders of the same
disk: ``async_save="never"`` and ``"always"``. Each round saves once with each (the order
rotates between rounds: interleaved, with a third entry that only trains), and after each save
runs ``--steps`` training steps:

* **stall**: wall time of ``save(..., wait=False)``, the time the loop is blocked (synchronous:
  the whole save; asynchronous: the copy to host memory and the queueing);
* **step**: the time per training step of the ``--steps`` steps after it (asynchronous: while the
  background thread writes, so on a machine with few cores they pay for the writing too), against
  the same steps in the round's entry without a save; then **wait**: what is left
  of the background save after them (``manager.wait()``, 0 for a synchronous save);
* **to COMPLETE**: from the call to the moment rank 0 wrote ``COMPLETE`` (the marker's time).

Times are the maximum over ranks. A training step on one CPU is far slower than on a GPU, and
the copy to host memory on a GPU is a device-to-host transfer, not a memcpy: these numbers are
this machine's, not a GPU's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cpu_zero3_engine, median, table, write_json

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8
MODES = ("sync", "async")


def rank_body(preset: str, rounds: int, steps: int, root: str) -> dict:
    import torch.distributed as dist

    from hp_deepspeed.checkpointing import CheckpointManager
    from hp_deepspeed.checkpointing.config import CheckpointConfig
    from hp_deepspeed.checkpointing.layout import read_marker
    from hp_deepspeed.launching import collectives

    engine, t5_config = cpu_zero3_engine(preset, NUM_TASKS)
    managers = {mode: CheckpointManager(CheckpointConfig(interval=1, keep_last=1, resume="auto",
                                                         async_save="never" if mode == "sync" else "always"),
                                        Path(root) / mode, model_config={"preset": preset})
                for mode in MODES}
    engine.train()
    ids = torch.randint(2, t5_config.vocab_size, (1, 16))

    def train_step() -> None:
        engine.backward(engine(input_ids=ids, labels=ids, task_ids=torch.zeros(1, dtype=torch.long)).loss)
        engine.step()

    def slowest(seconds: float) -> float:
        return collectives.all_reduce(torch.tensor([seconds], dtype=torch.float64), "max").item()

    train_step()
    out: dict = {mode: {"stall_s": [], "steps_s": [], "wait_s": [], "to_complete_s": []} for mode in MODES}
    out["quiet_step_s"] = []  # steps with no save in flight, in the same rounds: the reference
    step = 1
    for r in range(rounds + 1):  # round 0 warms up (first save allocates the host copies)
        order = MODES + ("none",)
        for mode in order[r % 3:] + order[:r % 3]:
            if mode == "none":
                collectives.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    train_step()
                if r > 0:
                    out["quiet_step_s"].append(slowest(time.perf_counter() - start) / steps)
                continue
            manager = managers[mode]
            collectives.barrier()
            called_at, start = time.time(), time.perf_counter()
            final = manager.save(engine, step, {"bench": True}, wait=False)
            stall = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                train_step()
            steps_s = time.perf_counter() - start
            start = time.perf_counter()
            manager.wait()
            wait_s = time.perf_counter() - start
            marker = read_marker(final) if dist.get_rank() == 0 else None
            to_complete = marker["time"] - called_at if marker else 0.0
            if r > 0:
                row = out[mode]
                row["stall_s"].append(slowest(stall))
                row["steps_s"].append(slowest(steps_s) / steps)
                row["wait_s"].append(slowest(wait_s))
                row["to_complete_s"].append(slowest(to_complete))
            step += 1
    for manager in managers.values():
        manager.finish_deletions()
    step_dir = max((Path(root) / "sync" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    out["checkpoint_bytes"] = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    out["params"] = sum(int(p.ds_numel) for p in engine.module.parameters())
    return out


def run(preset: str = "t5-small", ranks=(1, 2), rounds: int = 3, steps: int = 3, out: str = "checkpoint_stall",
        timeout: float = 900) -> dict:
    from hp_deepspeed.testing.ranks import run_ranks

    load_before = os.getloadavg()
    results = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hp-bench-stall-", dir=str(REPO / "bench" / "results")) as root:
        for world in ranks:
            r = run_ranks("bench.checkpoint_stall:rank_body", world, timeout=timeout,
                          args=(preset, rounds, steps, str(Path(root) / f"ranks{world}")))[0]
            quiet = median(r["quiet_step_s"])
            for mode in MODES:
                m = r[mode]
                m.update({name[:-2] + "_s_median": median(m[name])
                          for name in ("stall_s", "steps_s", "wait_s", "to_complete_s")})
                rows.append([world, mode, m["stall_s_median"], ", ".join(f"{t:.2f}" for t in m["stall_s"]),
                             m["steps_s_median"], quiet, m["wait_s_median"], m["to_complete_s_median"]])
            r["stall_async_over_sync"] = r["async"]["stall_s_median"] / r["sync"]["stall_s_median"]
            results[world] = r
            print(f"{world} rank(s): {r['params'] / 1e6:.1f}M params, checkpoint {r['checkpoint_bytes'] / 1e6:.0f} MB, "
                  f"stall async/sync {r['stall_async_over_sync']:.3f}", flush=True)
    print(table(["ranks", "save", "stall s (median)", "stall s per round", "step s after save",
                 "step s, no save", "wait s left", "to COMPLETE s"], rows))
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    result = {"benchmark": "checkpoint_stall", "preset": preset, "zero_stage": 3, "precision": "fp32",
              "variant": "hyperprompt_global", "rounds": rounds, "steps_after_save": steps,
              "loadavg_before": list(load_before), "loadavg_after": list(load_after),
              "by_ranks": {str(world): r for world, r in results.items()}}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (after one warm-up round)")
    parser.add_argument("--steps", type=int, default=3, help="training steps after each save")
    parser.add_argument("--out", default="checkpoint_stall")
    args = parser.parse_args(argv)
    run(args.preset, tuple(args.ranks), args.rounds, args.steps, args.out)


if __name__ == "__main__":
    main()
