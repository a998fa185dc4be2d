"""One rank of tests/launching/test_shutdown.py: which threads are still running after a clean
exit's ``shutdown_distributed``.

    python tests/scripts/shutdown_threads.py toy OUT
    python tests/scripts/shutdown_threads.py cli OUT train --config JOB.yaml ...

``toy``: a ZeRO-3 engine (tests/checkpointing/toy.py) trains a step inside a function that then
returns, as a command does, and ``torch.distributed.nn.functional`` is imported after the group
exists, as DeepSpeed's sequence parallelism imports it. ``cli``: the real command,
``hp_deepspeed.cli.main(ARGS)``, which calls ``shutdown_distributed`` itself. The rank writes the
thread names (``/proc/self/task/*/comm``) just before and after ``shutdown_distributed`` to
OUT/threads<rank>.json.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from hp_deepspeed.launching import distributed

seen: dict[str, object] = {}  # rank, and the thread names before and after


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            pass
    return sorted(names)


def recorded_shutdown(real=distributed.shutdown_distributed) -> None:
    seen["rank"] = dist.get_rank()
    seen["before"] = thread_names()
    real()
    seen["after"] = thread_names()


def toy_command() -> None:
    from tests.checkpointing.toy import make_engine, train_step

    engine = make_engine()
    train_step(engine, 1)
    importlib.import_module("torch.distributed.nn.functional")


mode, out = sys.argv[1], Path(sys.argv[2])
distributed.shutdown_distributed = recorded_shutdown  # the CLI imports it from the module at exit
if mode == "toy":
    dist.init_process_group("gloo")  # from the environment, with a TCP store on rank 0, as a real run
    toy_command()
    distributed.shutdown_distributed()
else:
    from hp_deepspeed import cli

    if cli.main(sys.argv[3:]) != 0:
        sys.exit("the command failed")
(out / f"threads{seen['rank']}.json").write_text(json.dumps(seen))
