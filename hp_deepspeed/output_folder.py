"""Output folders written whole or not at all (``export --out``, ``convert-universal --out``).

``whole_folder(target, overwrite)`` creates a fresh folder next to ``target`` (same file
system, so the final rename is atomic), yields it for the writer, and only when the writer
returns renames it into place. A writer that fails leaves nothing behind: the partial folder is
removed and ``target`` is untouched. A non-empty ``target`` is refused before any work unless
``overwrite`` is set, and then replaced as a whole (the old folder is moved aside, the new one
renamed in, the old one deleted), so files of an older output never sit beside new ones.

The folder is created at the start: a read-only or forbidden parent fails in seconds, before
the writer loads a model. It does not own what is written inside.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hp_deepspeed.config import ConfigError
from hp_deepspeed.io_errors import find_os_error

PARTIAL = ".partial-"


class OutputExistsError(ConfigError):
    """The output folder exists and is not empty, and replacing it was not asked for."""


def check_target(target: Path, overwrite: bool, option: str) -> None:
    """Refuse a target that is a file, or a non-empty folder without ``overwrite``."""
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise OutputExistsError(f"{option} {target}: exists and is not a folder")
    if target.is_dir() and not overwrite:
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise OutputExistsError(
                f"{option} {target}: folder is not empty ({shown}); pass --overwrite to replace it as a "
                f"whole, or choose another folder")


@contextmanager
def whole_folder(target: str | Path, overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    target = Path(target).absolute()
    check_target(target, overwrite, option)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{PARTIAL}"))
    except OSError as err:  # the folder the user named, not our temporary name in it
        raise OSError(err.errno, err.strerror, str(target.parent)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide an export from its readers
    try:
        yield staging
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        cause = find_os_error(err)
        if cause is not None and cause is not err:  # wrapped by a writer (safetensors keeps only the errno)
            raise OSError(cause.errno, os.strerror(cause.errno), cause.filename or str(target)) from err
        raise
    old = None
    if target.exists():
        check_target(target, overwrite, option)  # filled by someone else while we wrote
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / target.name)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old / target.name, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
