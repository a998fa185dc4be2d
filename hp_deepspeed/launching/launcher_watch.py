"""In a rank: notice that the launcher the rank runs under has gone.

Owns: which process is "the launcher" of this rank (``find_launcher``, a pure function over a
process table, so it is tested without processes), and a daemon thread that checks once a
second whether that process still lives and calls back once when it does not. Does not own what
the rank then does (training/preemption.py turns it into the same agreed save-and-stop as a
preemption signal), nor stopping launchers or ranks from outside (launching/supervise.py).

Why: a launcher killed by a signal it does not pass on leaves its ranks training with nobody to
stop them. DeepSpeed 0.19.8's runner, started by hand, dies on SIGTERM and installs no handler
for a one-node run, so its per-node ``launch.py`` and the ranks train on, detached. A rank that
notices keeps the work: it saves at an agreed step and stops.

Which launcher: the topmost ancestor of the rank that is a known launcher (the deepspeed runner,
DeepSpeed's ``launch.py``, torchrun / ``torch.distributed.run``, ``mpirun``/``mpiexec``/
``orterun``/``prterun`` and the per-node daemons of MPICH and Open MPI). Never a shell, nohup,
a terminal or a scheduler's step daemon: a run started under nohup must survive its terminal
closing. A process is named by its pid and its start time (field 22 of ``/proc/PID/stat``), so
a pid the kernel reuses for another process is not mistaken for the launcher.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

POLL_S = 1.0
"""How often the watch checks the launcher: a stat of one /proc file, nothing on the step's path."""

LAUNCHER_PROGRAMS = frozenset({
    "mpirun", "mpiexec", "mpiexec.hydra", "hydra_pmi_proxy",  # MPICH (Hydra)
    "orterun", "orted", "prterun", "prted",  # Open MPI 4 and 5
})
"""Launchers that are programs of their own (``argv[0]``'s base name)."""

LAUNCHER_SCRIPTS = frozenset({"deepspeed", "torchrun"})
"""Launchers that are Python console scripts (``python /venv/bin/NAME ...`` once the kernel has
read their ``#!`` line)."""

LAUNCHER_MODULES = frozenset({
    "deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch",
})
"""Launchers that are run as ``python -m MODULE``."""


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    start: int
    """Start time in clock ticks after boot: with the pid, the process's identity."""
    state: str
    argv: tuple[str, ...]


def launcher_name(argv: tuple[str, ...] | list[str]) -> str | None:
    """The launcher ``argv`` runs (one of the names above), or None for any other program."""
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program in LAUNCHER_PROGRAMS or program in LAUNCHER_SCRIPTS:
        return program
    if not program.startswith("python"):
        return None
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "-m":
            module = argv[i + 1] if i + 1 < len(argv) else ""
            return module if module in LAUNCHER_MODULES else None
        if argv[i] == "-c":
            return None
        i += 2 if argv[i] in ("-W", "-X") else 1
    script = os.path.basename(argv[i]) if i < len(argv) else ""
    return script if script in LAUNCHER_SCRIPTS else None


def find_launcher(table: Mapping[int, Process], pid: int) -> Process | None:
    """The topmost ancestor of ``pid`` in ``table`` that is a launcher, or None when none is:
    the process whose exit leaves the rank without anyone to stop it."""
    found, seen = None, {pid}
    current = table.get(pid)
    while current is not None and current.ppid not in seen and current.ppid > 0:
        seen.add(current.ppid)
        current = table.get(current.ppid)
        if current is not None and launcher_name(current.argv):
            found = current
    return found


def read_process(pid: int) -> Process | None:
    """Process ``pid`` as /proc shows it now, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return Process(pid, int(fields[1]), int(fields[19]), fields[0].decode(), argv)
    except (IndexError, ValueError):
        return None


def ancestors(pid: int) -> dict[int, Process]:
    """``pid`` and its ancestors, read from /proc: the part of the process table ``find_launcher`` walks."""
    table: dict[int, Process] = {}
    while pid > 0 and pid not in table:
        proc = read_process(pid)
        if proc is None:
            break
        table[pid] = proc
        pid = proc.ppid
    return table


def is_alive(launcher: Process) -> bool:
    """Whether ``launcher`` still runs: the same pid with the same start time, not a zombie."""
    now = read_process(launcher.pid)
    return now is not None and now.start == launcher.start and now.state not in ("Z", "X")


class LauncherWatch:
    """Calls ``on_gone(launcher)`` once, from a daemon thread, when ``launcher`` has exited."""

    def __init__(self, launcher: Process, on_gone: Callable[[Process], None], poll_s: float = POLL_S) -> None:
        self.launcher, self.on_gone, self.poll_s = launcher, on_gone, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hp-launcher-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not is_alive(self.launcher):
                self.on_gone(self.launcher)
                return

    def start(self) -> "LauncherWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def watch_launcher(on_gone: Callable[[Process], None], poll_s: float = POLL_S) -> LauncherWatch | None:
    """Start watching the launcher this process runs under; None (nothing started) when it runs
    under none, or where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    launcher = find_launcher(ancestors(os.getpid()), os.getpid())
    return None if launcher is None else LauncherWatch(launcher, on_gone, poll_s).start()
