"""torch behaviours the project works around, each with the version it was written against.

Owns: rebinding default arguments that captured a process group, and which ``ninja`` torch's
JIT extension builds use. Does not own: the device and collective rules (``launching/``).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import MutableMapping


def _is_group(value) -> bool:
    import torch.distributed as dist

    return issubclass(type(value), dist.ProcessGroup)


def unbind_default_process_groups(fn) -> None:
    """Replace default arguments of ``fn`` that hold a process group by ``None``.

    torch 2.13 (``torch.distributed.nn.functional``, and DeepSpeed 0.19.8's
    ``TorchBackend.barrier``): ``group=GroupMember.WORLD`` is bound when the module is imported;
    imported after the group exists, the function holds it for the life of the process. ``None``
    means the same there: the default group, whichever exists when the function is called.
    """
    if fn.__defaults__ and any(map(_is_group, fn.__defaults__)):
        fn.__defaults__ = tuple(None if _is_group(d) else d for d in fn.__defaults__)
    if fn.__kwdefaults__ and any(map(_is_group, fn.__kwdefaults__.values())):
        fn.__kwdefaults__ = {k: None if _is_group(d) else d for k, d in fn.__kwdefaults__.items()}


def environment_ninja_first(env: MutableMapping[str, str], executable: str | None = None) -> None:
    """Put the interpreter's ``bin`` first on PATH when it holds a ``ninja`` that PATH would not pick.

    torch 2.13's ``cpp_extension`` (which DeepSpeed 0.19.8 JIT-builds its ops with) runs the
    ``ninja`` on PATH: a rank started over ssh gets sshd's PATH, the system's ninja or none, and
    two ninja versions (1.11, 1.13) hash build commands differently, so each rebuilds the
    other's build in the shared cache (28 s on 2 cores each time).
    """
    tools = os.path.dirname(executable or sys.executable)
    ninja = os.path.join(tools, "ninja")
    if os.access(ninja, os.X_OK) and shutil.which("ninja", path=env.get("PATH", "")) != ninja:
        env["PATH"] = os.pathsep.join([tools, env["PATH"]]) if env.get("PATH") else tools
