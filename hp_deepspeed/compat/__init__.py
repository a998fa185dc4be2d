"""Every workaround of a DeepSpeed, torch or transformers behaviour, in one place.

Whoever upgrades one of these libraries reads this package and nothing else: each function
names the library version it was written against and, in one line, why it exists. The rest of
``hp_deepspeed`` calls these functions by name and does not reach into the libraries' private
names itself (``tests/compat/test_private_names.py`` checks the source tree).

Modules:

``compat.deepspeed``
    DeepSpeed 0.19.x: the accelerator chosen at import, its op builder's parsing of
    ``TORCH_CUDA_ARCH_LIST``, ``zero.Init``'s dtype, the engine's LOCAL_RANK assertion, the
    bf16 + fp32-accumulation stage, and the clean-up at exit (engines, module stack, group
    caches, memoised methods, the CPU all-reduce file), and the shm op's per-rank build message.
``compat.torch``
    torch 2.13: default arguments bound to a process group at import, the ``ninja`` that JIT
    extension builds pick from PATH, and the private ``TorchDispatchMode`` the planner needs.

Not here: the checkpoint save/load workarounds (``compat.checkpoint``, owned by the checkpoint
code), and choices that use a library's documented options as intended (for example
``memory_efficient_linear: false`` in ``training/parallelism.py``).

The supported version range is :data:`DEEPSPEED_SUPPORTED` (also ``setup.cfg``);
:func:`deepspeed_version_problem` says, in one line, when the installed DeepSpeed is outside it.
"""

from __future__ import annotations

DEEPSPEED_SUPPORTED = ("0.19.3", "0.20")
"""[lowest, highest) DeepSpeed version the suite runs against; keep equal to setup.cfg's pin."""


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def deepspeed_version_problem(version: str | None = None) -> str | None:
    """One line saying why ``version`` (default: the installed DeepSpeed) is outside the tested
    range, or None when it is inside."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            version = installed("deepspeed")
        except PackageNotFoundError:
            return "DeepSpeed is not installed (pip install -e .)"
    low, high = DEEPSPEED_SUPPORTED
    if _release(low) <= _release(version) < _release(high):
        return None
    return (f"DeepSpeed {version} is outside the tested range >={low},<{high}: the "
            "workarounds in hp_deepspeed/compat/ were written for that range; check each against "
            "the new version, then widen DEEPSPEED_SUPPORTED and setup.cfg together")
