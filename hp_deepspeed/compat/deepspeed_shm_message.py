"""DeepSpeed 0.19.8 prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
from every CPU rank at every start, also when the op only comes out of the extensions cache: a
line per rank that tells a person nothing. ``quiet_shm_op_message()`` wraps
``deepspeed.comm.torch.build_shm_op`` so that the op loads as before without that print; a
failed build still raises with DeepSpeed's own error, and the compiler's output of a first
build (written by the build tools, not by this print) still shows.
"""

from __future__ import annotations

import contextlib
import importlib
import io


def quiet_shm_op_message() -> None:
    try:  # by module path: the package's attribute ``torch`` is the torch module itself
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    original = getattr(ds_comm_torch, "build_shm_op", None)
    if original is None or getattr(original, "_hp_quiet", False):
        return

    def build_shm_op():
        with contextlib.redirect_stdout(io.StringIO()):
            return original()

    build_shm_op._hp_quiet = True
    ds_comm_torch.build_shm_op = build_shm_op
