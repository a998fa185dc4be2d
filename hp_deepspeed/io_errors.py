"""Operating-system errors in words: a full disk, a read-only or forbidden folder, a quota.

``describe_os_error(err, path)`` turns an ``OSError`` into one line naming the path and the
cause ("no space left on device", "read-only file system", ...), so a command that runs out of
disk says so instead of printing a traceback (or a library's ``unexpected pos`` message);
``resource_error(err)`` says whether the error is such a resource problem at all. ``cli.main``
prints the line for ``export``, ``convert-universal`` and ``predict`` with exit code
``EXIT_IO_ERROR``; the trainer's run-dir check (``training/run_lock.py``) uses the same words.

It does not decide what to clean up after a failed write; the writers do that.
"""

from __future__ import annotations

import errno
import os
import re

# sysexits' EX_IOERR: an error while doing I/O on some file (bad input is 2).
EXIT_IO_ERROR = 74

RESOURCE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error (a failing disk or a lost network file system)",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "is a folder, expected a file",
}


def resource_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is an OSError of the kinds above."""
    return find_os_error(err) is not None


# How Rust's std::io::Error ends its message (safetensors' SafetensorError carries it as text).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def find_os_error(err: BaseException | None) -> OSError | None:
    """The resource OSError behind ``err``: libraries (torch's writer, safetensors) often wrap it,
    or, as safetensors does, only keep its errno in the message."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in RESOURCE_ERRNOS:
            return err
        match = _RUST_OS_ERROR.search(str(err))
        if match and int(match.group(1)) in RESOURCE_ERRNOS:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        err = err.__cause__ or err.__context__
    return None


def describe_os_error(err: BaseException, path: str | os.PathLike | None = None) -> str:
    """One line: the path, then what went wrong in words (``path`` when the error has none)."""
    os_err = find_os_error(err) or err
    code = getattr(os_err, "errno", None)
    words = RESOURCE_ERRNOS.get(code) or (os.strerror(code) if code else str(os_err))
    where = getattr(os_err, "filename", None) or path
    name = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
    return f"{where}: {words}{name}" if where else f"{words}{name}"
