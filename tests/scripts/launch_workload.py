"""A tiny real training job for the launcher tests, with the trainer's command-line contract.

    python -m tests.scripts.launch_workload train [--config FILE] [--resume auto] [key=value ...]
    python -m tests.scripts.launch_workload eval [--checkpoint auto] run.dir=PATH

Understood overrides: ``run.dir=PATH`` (required), ``train.steps=N`` (default 6),
``train.step_sleep=SECONDS`` (default 0). Like the real trainer it calls
``hp_deepspeed.launching.distributed.init_distributed()`` first, runs ZeRO-3 steps of a toy
model through ``deepspeed.initialize``, and on SIGUSR1/SIGTERM stops at the next step boundary
(all ranks agree through an all-reduce), records the completed step count in
``run.dir/checkpoints/state.json`` and exits 75. With ``--resume auto`` it continues from that
count. Each rank appends the steps it ran to ``run.dir/steps-rank{R}.txt`` and writes
``run.dir/rank{R}.json`` (its DistInfo, SLURM_RESTART_COUNT, first and last step) on exit.
``eval`` all-reduces the checkpointed step count and writes ``run.dir/eval-rank{R}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from hp_deepspeed.launching.distributed import init_distributed, shutdown_distributed

EX_PREEMPTED = 75
_stop_requested = False


def _request_stop(signum, frame):
    global _stop_requested
    _stop_requested = True
    print(f"[workload] rank {os.environ.get('RANK')} got signal {signum}", flush=True)


def evaluate(info, run_dir: Path, state_file: Path) -> int:
    """The eval contract: read the run's checkpoint, agree on a number, write it per rank."""
    step = json.loads(state_file.read_text())["step"] if state_file.exists() else -1
    total = torch.tensor([float(step)])
    dist.all_reduce(total)
    record = dict(info.as_dict(), checkpoint_step=step, summed=total.item())
    (run_dir / f"eval-rank{info.rank}.json").write_text(json.dumps(record))
    dist.barrier()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--config")
        p.add_argument("--local_rank", type=int)  # passed by the deepspeed launcher
        p.add_argument("overrides", nargs="*")
    sub.choices["train"].add_argument("--resume", choices=["auto"])
    sub.choices["eval"].add_argument("--checkpoint", default="auto")
    args = parser.parse_args(argv)
    overrides = dict(o.split("=", 1) for o in args.overrides)
    run_dir = Path(overrides["run.dir"])
    steps = int(overrides.get("train.steps", 6))
    step_sleep = float(overrides.get("train.step_sleep", 0))

    signal.signal(signal.SIGUSR1, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    info = init_distributed()
    rank = info.rank
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / "checkpoints" / "state.json"
    if args.command == "eval":
        return evaluate(info, run_dir, state_file)

    start = 0
    if args.resume == "auto" and state_file.exists():
        start = json.loads(state_file.read_text())["step"]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01), config=config,
    )
    assert engine.zero_optimization_stage() == 3
    generator = torch.Generator().manual_seed(rank)
    step, loss = start, None
    with (run_dir / f"steps-rank{rank}.txt").open("a") as steps_log:
        while step < steps:
            flag = torch.tensor([1.0 if _stop_requested else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
            x = torch.randn(2, 16, generator=generator)
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            steps_log.write(f"{step}\n")
            steps_log.flush()
            step += 1
            time.sleep(step_sleep)
    preempted = step < steps
    dist.barrier()
    if rank == 0:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"step": step}))
    record = dict(
        info.as_dict(), start_step=start, end_step=step, preempted=preempted,
        restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        loss=None if loss is None else loss.item(),
        # Which MPI library mpi4py loaded, for the ranks that found each other through it.
        mpi_library=(sys.modules["mpi4py.MPI"].Get_library_version().splitlines()[0]
                     if "mpi4py.MPI" in sys.modules else None),
    )
    (run_dir / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"[workload] rank {rank}/{info.world_size} via {info.source}: steps {start}..{step}"
          f"{' (preempted)' if preempted else ''}", flush=True)
    dist.barrier()
    return EX_PREEMPTED if preempted else 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    shutdown_distributed()  # as the real CLI does at a clean exit
    sys.exit(status)
