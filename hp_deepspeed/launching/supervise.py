"""Run a launcher (deepspeed, torchrun, mpirun) so that a signal to the command a person started
reaches every rank as "save and stop", and no process of the run outlives it.

    python -m hp_deepspeed.launching.supervise [--module hp_deepspeed.cli] -- deepspeed ... -m hp_deepspeed.cli train ...

The launch scripts (launch/*.sh) exec this in their own place, so the process a terminal, a
container runtime or a scheduler signals is this one. Left to themselves the launchers differ:
the deepspeed runner dies on SIGTERM and leaves its per-node launcher and the ranks training as
orphans; a terminal's Ctrl-C reaches every process of the foreground group, and each launcher
then prints its own traceback while killing the ranks in the middle of a collective.

What this process does:

 * starts the launcher in a new session, so a terminal's Ctrl-C reaches only this process, and
   marks itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so that a process whose
   launcher died is re-parented here rather than to init and can still be found and stopped;
 * on the first SIGINT, SIGTERM or SIGUSR1 it sends that signal to every *rank* (a Python process
   started as ``python [options] -m MODULE``), not to the launchers: each rank turns it into the
   trainer's save-and-stop (training/preemption.py) and exits with 75, which every launcher then
   reports as the run's exit status; ranks that appear later (a signal during start-up) get it
   when they appear;
 * on a second SIGINT or SIGTERM it kills every process of the run at once (no save) and exits
   130 (143 for SIGTERM);
 * when the launcher has exited, or ``HP_STOP_TIMEOUT`` seconds (default 300) after a stop was
   requested, whatever is left of the run gets SIGTERM, then SIGKILL after a few seconds.

Launchers report a rank's non-zero exit as a crash (torchrun raises ``ChildFailedError`` with a
traceback and exits 1, DeepSpeed logs ``[ERROR] ... exits with return code = 75``), so a rank
started under this process (``HP_SUPERVISOR_DIR`` set) that stopped after its save records 75 in
that folder and exits 0; this process then exits 75. It exits with the launcher's status when
that is not 0, 75 when a rank recorded a save-and-stop, or 128 + N when the launcher was killed by
signal N. What it does not do: restart anything, reach
ranks on other nodes (each node's own launcher or scheduler forwards there), or survive its own
SIGKILL (then the run is left as the launcher leaves it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Signals that mean "save and stop" and are passed on to the ranks."""

EXIT_PREEMPTED = 75
"""training.preemption.EXIT_PREEMPTED, repeated so that this process does not import torch."""

STATUS_DIR_ENV = "HP_SUPERVISOR_DIR"
"""Folder where a supervised rank records that it stopped after a save (see ``record_preempted``)."""

KILL_GRACE_S = 5.0
"""How long stray processes get between SIGTERM and SIGKILL once the run is over."""

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: orphans go to init, as without this process
        return False


def is_rank(argv: list[str], module: str) -> bool:
    """Whether ``argv`` is a Python interpreter running ``module`` as a rank: ``python [options]
    -m MODULE ...``. A launcher that merely names the module (``torchrun ... -m MODULE``,
    ``deepspeed --module MODULE``, ``python -m deepspeed.launcher.launch ... --module MODULE``)
    has a script or another module before it, so it is not a rank."""
    if len(argv) < 3 or not os.path.basename(argv[0]).startswith("python"):
        return False
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "-m":
            return i + 1 < len(argv) and argv[i + 1] == module
        if argv[i] in ("-W", "-X", "-c"):  # options that take a value
            if argv[i] == "-c":
                return False
            i += 1
        i += 1
    return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process on this machine (one pass over /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[0] != b"Z":
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(root: int) -> list[int]:
    """Live (not zombie) processes below ``root``, parents before children."""
    tree, found, todo = _children(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def record_preempted(exit_code: int) -> int:
    """In a rank: the exit code to give the launcher. Under a supervisor a save-and-stop is
    recorded for it and reported to the launcher as success; otherwise ``exit_code`` unchanged."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if exit_code != EXIT_PREEMPTED or not folder or not os.path.isdir(folder):
        return exit_code
    with open(os.path.join(folder, f"rank-{os.getpid()}"), "w") as f:
        f.write(str(exit_code))
    return 0


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class Supervisor:
    def __init__(self, command: list[str], module: str, stop_timeout: float) -> None:
        self.command, self.module, self.stop_timeout = command, module, stop_timeout
        self.requested: int | None = None
        """The first stop signal received, None until one arrives."""
        self.requested_at = 0.0
        self.killed_by: int | None = None
        """The signal of a second interrupt, after which everything was killed without a save."""
        self.signalled: set[int] = set()
        """Ranks the stop signal was sent to (each gets it once)."""
        self.child: subprocess.Popen | None = None
        self.status_dir = ""
        """Where supervised ranks record a save-and-stop (``record_preempted``); made by ``run``."""

    def _on_signal(self, signum, frame) -> None:
        if self.requested is None:
            self.requested, self.requested_at = signum, time.monotonic()
            name = signal.Signals(signum).name
            again = "Ctrl-C" if signum == signal.SIGINT else name
            print(f"hp-deepspeed: {name} received: every rank saves a checkpoint at its next step and stops "
                  f"({again} again stops at once without saving)", file=sys.stderr, flush=True)
        elif signum in (signal.SIGINT, signal.SIGTERM) and self.killed_by is None:
            self.killed_by = signum
            print(f"hp-deepspeed: {signal.Signals(signum).name} again: stopping every process now, "
                  "without saving", file=sys.stderr, flush=True)
            self._kill_all(signal.SIGKILL)

    def _kill_all(self, signum: int) -> None:
        for pid in descendants(os.getpid()):
            _signal(pid, signum)

    def _forward_to_ranks(self) -> None:
        for pid in descendants(os.getpid()):
            if pid not in self.signalled and is_rank(_cmdline(pid), self.module):
                self.signalled.add(pid)
                _signal(pid, self.requested)

    def _reap(self) -> int | None:
        """Reap every exited child (orphans re-parented here included); the launcher's status once it exited."""
        status = None
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == 0:
                return status
            if self.child is not None and pid == self.child.pid:
                self.child.returncode = os.waitstatus_to_exitcode(wait_status)
                status = self.child.returncode

    def run(self) -> int:
        _become_subreaper()
        for signum in FORWARDED:
            signal.signal(signum, self._on_signal)
        self.status_dir = tempfile.mkdtemp(prefix="hp-deepspeed-supervisor-")
        try:
            return self._run()
        finally:
            shutil.rmtree(self.status_dir, ignore_errors=True)

    def _run(self) -> int:
        # A new session: the terminal's Ctrl-C reaches this process only, which decides what the
        # ranks get. Launchers started by a script in the background have SIGINT ignored; the
        # ranks must not inherit that, or a forwarded SIGINT would do nothing.
        env = dict(os.environ, **{STATUS_DIR_ENV: self.status_dir})
        self.child = subprocess.Popen(self.command, start_new_session=True, env=env,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        launcher_status = None
        while launcher_status is None:
            if self.requested is not None and self.killed_by is None:
                self._forward_to_ranks()
                if time.monotonic() - self.requested_at > self.stop_timeout:
                    print(f"hp-deepspeed: the ranks did not stop within HP_STOP_TIMEOUT={self.stop_timeout:g}s "
                          "of the signal; killing them", file=sys.stderr, flush=True)
                    self._kill_all(signal.SIGKILL)
            launcher_status = self._reap()
            if launcher_status is None:
                time.sleep(0.2)
        self._clean_up()
        if self.killed_by is not None:
            return 128 + self.killed_by
        if launcher_status < 0:
            return 128 - launcher_status
        if launcher_status == 0 and os.listdir(self.status_dir):
            return EXIT_PREEMPTED
        return launcher_status

    def _clean_up(self) -> None:
        """Nothing of the run outlives this process: strays get SIGTERM, then SIGKILL."""
        left = descendants(os.getpid())
        if not left:
            self._reap()
            return
        print(f"hp-deepspeed: {len(left)} process(es) of the run outlived the launcher; stopping them",
              file=sys.stderr, flush=True)
        for pid in left:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        while descendants(os.getpid()) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        self._kill_all(signal.SIGKILL)
        while descendants(os.getpid()):
            self._reap()
            time.sleep(0.05)
        self._reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hp_deepspeed.launching.supervise", description=__doc__.split("\n")[0])
    parser.add_argument("--module", default=os.environ.get("HP_MODULE", "hp_deepspeed.cli"),
                        help="the module every rank runs (default: $HP_MODULE or hp_deepspeed.cli)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- LAUNCHER [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no launcher command given")
    try:
        stop_timeout = float(os.environ.get("HP_STOP_TIMEOUT", "300"))
    except ValueError:
        parser.error(f"HP_STOP_TIMEOUT={os.environ['HP_STOP_TIMEOUT']!r}: expected seconds")
    try:
        return Supervisor(command, args.module, stop_timeout).run()
    except FileNotFoundError as err:
        print(f"hp-deepspeed: error: cannot start {command[0]!r}: {err.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
