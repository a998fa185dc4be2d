"""Run a module as ``__main__`` from a file path, for launchers that only start script files.

    python /path/to/hp_deepspeed/launching/entry.py hp_deepspeed.cli train --config run.yaml

deepspeed's mpich runner wraps the program in its launcher_helper.py and cannot pass ``-m``
(it would run ``python -m /path/launcher_helper.py``), so launch/multinode.sh gives it this
file. Behaves like ``python -m MODULE ARGS...``.
"""

import runpy
import sys

if __name__ == "__main__":
    # sys.path[0] is this file's directory: drop it so its files cannot shadow top-level modules.
    del sys.path[0]
    if len(sys.argv) < 2:
        sys.exit("usage: entry.py MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
