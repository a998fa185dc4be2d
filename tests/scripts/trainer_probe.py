"""The real trainer (``python -m hp_deepspeed.cli``) with two test hooks, for the multi-node tests.

    HP_MODULE=tests.scripts.trainer_probe  ... the trainer's arguments ...

* Every rank records where it runs in ``run.dir/ranks/rank{R}-job{J}-restart{N}.json`` once the process
  group is up: its DistInfo, SLURM node name and node id, the interface gloo was told
  (GLOO_SOCKET_IFNAME) and the address that interface has.
* ``HP_CRASH_IN_SAVE=N``: every rank dies (``os._exit(17)``) in the middle of saving checkpoint
  ``step-N``, after DeepSpeed wrote its shards and before the COMPLETE marker, as a job killed
  during a save would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hp_deepspeed import cli
from hp_deepspeed.checkpointing import rng
from hp_deepspeed.launching import distributed
from hp_deepspeed.training import trainer


def _run_dir(argv: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")))


def _recording_init(run_dir: Path):
    def init(*args, **kwargs):
        info = distributed.init_distributed(*args, **kwargs)
        ifname = os.environ.get("GLOO_SOCKET_IFNAME", "")
        record = dict(info.as_dict(), node=os.environ.get("SLURMD_NODENAME"),
                      node_id=os.environ.get("SLURM_NODEID"), gloo_ifname=ifname,
                      address=distributed.interface_addresses().get(ifname),
                      restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                      # Which MPI library mpi4py loaded, for ranks that found each other through it.
                      mpi_library=(sys.modules["mpi4py.MPI"].Get_library_version().splitlines()[0]
                                   if "mpi4py.MPI" in sys.modules else None))
        job = os.environ.get("SLURM_JOB_ID", "none")
        out = run_dir / "ranks" / f"rank{info.rank}-job{job}-restart{record['restart']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record))
        return info

    return init


def _crashing_rng_save(step: int):
    save = rng.save

    def crash_or_save(folder, rank):
        if Path(folder).name.startswith(f"step-{step}."):
            print(f"[trainer_probe] rank {rank}: dying in the middle of saving step {step}", flush=True)
            os._exit(17)
        return save(folder, rank)

    return crash_or_save


def main(argv: list[str]) -> int:
    trainer.init_distributed = _recording_init(_run_dir(argv))
    if os.environ.get("HP_CRASH_IN_SAVE"):
        rng.save = _crashing_rng_save(int(os.environ["HP_CRASH_IN_SAVE"]))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
