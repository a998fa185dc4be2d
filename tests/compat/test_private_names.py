"""No module of hp_deepspeed outside compat/ names a private DeepSpeed attribute.

A DeepSpeed upgrade must only need a look at ``hp_deepspeed/compat/``; that holds only if the
rest of the package never reaches into DeepSpeed's internals. The source tree is checked, as
``tests/training/test_collectives.py`` does for collectives.

What "names a private DeepSpeed attribute" means here, in a module's syntax tree:

1. an ``import`` or ``from ... import`` of a ``deepspeed`` module in which a path component or an
   imported name starts with ``_`` (``from deepspeed.runtime.engine import _helper``);
2. an attribute chain rooted at a name bound by a ``deepspeed`` import with a component that
   starts with ``_`` and is not a dunder (``deepspeed.runtime._x``, ``ds_groups._WORLD_GROUP``;
   ``deepspeed.__version__`` is public);
3. a DeepSpeed module looked up by name in ``sys.modules`` (a string ``"deepspeed..."`` given to
   ``sys.modules.get``/``sys.modules[...]``): reaching into a module by name bypasses 1 and 2;
4. any attribute or name in :data:`DEEPSPEED_INTERNALS`: internals DeepSpeed does not document,
   whatever object they are read from (an engine passed in as an argument cannot be traced
   statically, so its private attributes are listed by name).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hp_deepspeed"
COMPAT = PACKAGE / "compat"

DEEPSPEED_INTERNALS = frozenset({
    "FWD_MODULE_STACK",            # runtime.zero.parameter_offload: ZeRO-3's stack of modules in forward
    "ds_accelerator",              # accelerator.real_accelerator: the accelerator chosen at import
    "_WORLD_GROUP",                # utils.groups: cached process groups
    "_config",                     # DeepSpeedEngine._config: the parsed config of a built engine
    "_set_dtype",                  # zero.Init's dtype choice
    "_do_optimizer_sanity_check",  # the engine's optimizer/dtype check
    "_configure_with_arguments",   # the engine's LOCAL_RANK assertion
    "PartitionedParameterCoordinator",  # ZeRO-3's gather/release bookkeeping
    "fp32_partitioned_groups_flat",  # ZeRO-3's flat fp32 master partitions (adopted at load)
})

ALLOWED: set[Path] = set()  # files outside compat/ that may name DeepSpeed's internals: none


def _deepspeed_module(name: str | None) -> bool:
    return bool(name) and (name == "deepspeed" or name.startswith("deepspeed."))


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _is_sys_modules(node: ast.AST) -> bool:
    return ast.unparse(node) == "sys.modules"


def private_deepspeed_names(source: str) -> list[str]:
    """``what:line`` of each private DeepSpeed name ``source`` uses (see the module docstring)."""
    tree = ast.parse(source)
    roots: set[str] = set()  # local names bound to a deepspeed module or object
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _deepspeed_module(alias.name):
                    roots.add(alias.asname or alias.name.split(".")[0])
                    if any(map(_private, alias.name.split("."))):
                        found.append(f"import {alias.name}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom) and _deepspeed_module(node.module):
            for alias in node.names:
                roots.add(alias.asname or alias.name)
                if any(map(_private, node.module.split("."))) or _private(alias.name) \
                        or alias.name in DEEPSPEED_INTERNALS:
                    found.append(f"from {node.module} import {alias.name}:{node.lineno}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in DEEPSPEED_INTERNALS:
                found.append(f"{ast.unparse(node)}:{node.lineno}")
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in roots and any(map(_private, chain)):
                found.append(f"{ast.unparse(node)}:{node.lineno}")
        elif isinstance(node, ast.Name) and node.id in DEEPSPEED_INTERNALS:
            found.append(f"{node.id}:{node.lineno}")
        elif isinstance(node, ast.Constant) and node.value in DEEPSPEED_INTERNALS:
            found.append(f"{node.value!r}:{node.lineno}")
        elif isinstance(node, ast.Subscript) and _is_sys_modules(node.value):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and _deepspeed_module(key.value):
                found.append(f"sys.modules[{key.value!r}]:{node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and _is_sys_modules(node.func.value) and node.args:
            key = node.args[0]
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and _deepspeed_module(key.value):
                found.append(f"sys.modules.{node.func.attr}({key.value!r}):{node.lineno}")
    return sorted(set(found), key=lambda s: int(s.rsplit(":", 1)[1]))


def test_no_module_outside_compat_names_a_private_deepspeed_attribute():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if COMPAT not in path.parents and path not in ALLOWED
        if (names := private_deepspeed_names(path.read_text()))
    }
    assert not offenders, (
        "reach DeepSpeed's internals through a named function of hp_deepspeed/compat/ "
        f"(with the version it was written for and why): {offenders}")


def test_compat_itself_is_where_the_internals_are_named():
    """The scan is not vacuous: compat/deepspeed.py does name internals, and is found to."""
    assert private_deepspeed_names((COMPAT / "deepspeed.py").read_text())


@pytest.mark.parametrize("source", [
    "from deepspeed.runtime.engine import _helper",
    "import deepspeed._private",
    "import deepspeed\ndeepspeed.runtime._x.y",
    "from deepspeed.utils import groups\ngroups._WORLD_GROUP = None",
    "from deepspeed.utils import groups as g\ng._DATA_PARALLEL_GROUP",
    "import sys\nsys.modules.get('deepspeed.runtime.zero.parameter_offload')",
    "import sys\nsys.modules['deepspeed.utils.groups']",
    "def f(engine):\n    return engine._config.load_universal_checkpoint",
    "stack = getattr(module, 'FWD_MODULE_STACK', None)",
])
def test_the_scan_sees_each_spelling(source):
    assert private_deepspeed_names(source), source


@pytest.mark.parametrize("source", [
    "import deepspeed\ndeepspeed.__version__",
    "import deepspeed\ndeepspeed.zero.Init(config_dict_or_path=c)",
    "from deepspeed.utils import set_z3_leaf_module",
    "import torch\ntorch._C",   # not DeepSpeed's
    "self._on_disk_step = 3",   # the project's own private attributes
])
def test_the_scan_lets_public_and_own_names_pass(source):
    assert not private_deepspeed_names(source), source
