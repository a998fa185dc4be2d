"""One rank of ``run_ranks``: ``python -m hp_deepspeed.testing.rank_entry module:function DIR``.

Initialises a gloo process group from the environment, calls the function with the pickled
arguments in DIR/args.pkl and writes its return value to DIR/result<rank>.pkl.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hp_deepspeed.launching.distributed import shutdown_distributed


def main() -> None:
    target, workdir = sys.argv[1], Path(sys.argv[2])
    module_name, func_name = target.split(":", 1)
    func = getattr(importlib.import_module(module_name), func_name)
    args = pickle.loads((workdir / "args.pkl").read_bytes())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("HP_DIST_TIMEOUT", "300"))))
    try:
        result = func(*args)
        rank = dist.get_rank()
        (workdir / f"result{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        shutdown_distributed()  # the process group and DeepSpeed's /dev/shm all-reduce file


if __name__ == "__main__":
    main()
