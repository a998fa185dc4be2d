"""torch behaviours the project works around, each with the version it was written against.

Owns: rebinding default arguments that captured a process group, which ``ninja`` torch's JIT
extension builds use and in which folder, and the one private torch class the project subclasses (the dispatch
mode of the memory planner). Does not own: the device and collective rules (``launching/``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from typing import MutableMapping


def unbind_default_process_groups(functions) -> None:
    """Replace default arguments of ``functions`` that hold a process group by ``None``.

    torch 2.13 (``torch.distributed.nn.functional``, and DeepSpeed 0.19.8's
    ``TorchBackend.barrier``): ``group=GroupMember.WORLD`` is bound when the module is imported;
    imported after the group exists, the function holds it for the life of the process. ``None``
    means the same there: the default group, whichever exists when the function is called.
    """
    import torch.distributed as dist

    def group(value) -> bool:  # by type: isinstance would read attributes of arbitrary objects
        return issubclass(type(value), dist.ProcessGroup)

    for fn in functions:
        if fn.__defaults__ and any(map(group, fn.__defaults__)):
            fn.__defaults__ = tuple(None if group(d) else d for d in fn.__defaults__)
        if fn.__kwdefaults__ and any(map(group, fn.__kwdefaults__.values())):
            fn.__kwdefaults__ = {k: None if group(d) else d for k, d in fn.__kwdefaults__.items()}


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


def environment_extensions_dir(env: MutableMapping[str, str]) -> None:
    """Give each Python environment its own JIT-extension build folder, unless
    ``TORCH_EXTENSIONS_DIR`` is set already.

    torch 2.13's default folder is one per user and Python version (``~/.cache/torch_extensions/
    py311_cpu``), one subfolder per op, and an op's build file names the include paths of the
    environment that built it: two environments of one user (venvs, checkouts) each find the
    other's build file changed and recompile, so DeepSpeed 0.19.8's CPU collective op was built
    again at rank start (30-45 s on 2 cores) whenever another environment had started ranks since.
    The folder is keyed by the paths the build names (found without importing anything) and
    torch's version; ``make shm-op`` builds into the same folder.
    """
    if env.get("TORCH_EXTENSIONS_DIR"):
        return
    paths = []
    for package in ("torch", "deepspeed"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            paths.append(os.path.dirname(spec.origin))
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    key = hashlib.sha256("\0".join([sys.prefix, torch_version, *paths]).encode()).hexdigest()[:12]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = f"py{sys.version_info.major}{sys.version_info.minor}-{key}"
    env["TORCH_EXTENSIONS_DIR"] = os.path.join(cache, "torch_extensions", name)


def dispatch_mode_base() -> type:
    """torch's ``TorchDispatchMode``, the base of a mode that sees every op, backward included.

    torch 2.13 has it only in the private ``torch.utils._python_dispatch`` (the public
    ``torch.overrides.TorchFunctionMode`` does not see the ops autograd runs in a backward);
    the planner's measurement of the conditioning's backward (``tools/plan_model.py``) needs it.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def torch_function_mode() -> type:
    """``torch.overrides.TorchFunctionMode``: the public way to see ``torch.nn.functional`` calls
    (a benchmark records each attention call with it instead of replacing the function)."""
    from torch.overrides import TorchFunctionMode

    return TorchFunctionMode


def sdpa_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> str:
    """The name of the kernel ``F.scaled_dot_product_attention`` picks for these arguments
    (``FLASH_ATTENTION``, ``EFFICIENT_ATTENTION``, ``MATH`` ...).

    torch 2.13 exposes the choice only as the private ``torch._fused_sdp_choice``; the public
    ``torch.backends.cuda.can_use_*`` say what could run, not what does. Used by a benchmark.
    """
    import torch
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    return SDPBackend(choice).name
