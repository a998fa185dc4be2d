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
 * with ``--drop-node-launcher-info``, leaves DeepSpeed's per-node launcher info lines out of the
   launcher's standard output (compat/deepspeed.py says why), passing the rest on line by line;
 * when the launcher has exited, or ``HP_STOP_TIMEOUT`` seconds (default 300) after a stop was
   requested, whatever is left of the run gets SIGTERM, then SIGKILL after a few seconds.

Launchers report a rank's non-zero exit as a crash (torchrun raises ``ChildFailedError`` with a
traceback and exits 1, DeepSpeed logs ``[ERROR] ... exits with return code = 75``), so a rank
started under this process (``HP_SUPERVISOR_DIR`` set) that stopped after its save records 75 in
that folder and exits 0; this process then exits 75. It exits 75 when a rank recorded a
save-and-stop (also when the launcher then failed or was killed, with one line saying so),
otherwise with the launcher's status, or 128 + N when the launcher was killed by signal N.

Other nodes (``--hostfile``, given by launch/multinode.sh for deepspeed's pdsh runner, and for
its openmpi and mpich runners when pdsh is installed): the runner's ssh sessions do not carry a signal to
the remote side (without a tty, sshd does not signal the remote command when the client dies),
and deepspeed's own SIGTERM handler kills the remote ranks without a save. So every process of
the run carries a run tag in its environment (``RUN_TAG_ENV``), and this process reaches the
hosts itself, over pdsh with the runner's ssh options, to run this module in ``--on-node`` mode
there:

 * ``--on-node signal``: on that host, the stop signal to every rank of the run not signalled
   before (ranks that appear later get it on the next pass, every ``REMOTE_PASS_S``); a rank's
   save-and-stop is recorded in a folder on that host (``node_status_dir``) instead of
   ``HP_SUPERVISOR_DIR``;
 * ``--on-node finish``, once the launcher has exited (or at a second interrupt or the stop
   timeout): lets ranks there that are saving finish (``let_ranks_finish``), reports how many
   ranks there recorded a save, then SIGTERM and SIGKILL to every process of the run still alive
   on that host, and removes the folder.

A launcher can exit while its ranks save: the deepspeed runner sent a signal itself runs
``pkill`` over the hosts and exits 1 a second later, and its per-node launchers pass SIGTERM to
the ranks. So a rank records that it is saving once the ranks agree to stop (``record_saving``),
and after the launcher's exit ranks still saving, here and on the hosts, get up to the stop
timeout instead of ``KILL_GRACE_S``; the run then exits 75 when the ranks recorded their save.

A launcher that forwards one signal to every rank itself (``--launcher-forwards USR1`` for srun,
which slurmstepd delivers to every process of the step on every node) gets that signal instead,
once: srun answers SIGINT with a status report and SIGTERM by killing the step without a save,
so those two never reach it from here.

What it does not do: restart anything, or survive its own SIGKILL (then the run is left as the
launcher leaves it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Signals that mean "save and stop" and are passed on to the ranks."""

EXIT_PREEMPTED = 75
"""training.preemption.EXIT_PREEMPTED, repeated so that this process does not import torch."""

STATUS_DIR_ENV = "HP_SUPERVISOR_DIR"
"""Folder where a supervised rank records that it stopped after a save (see ``record_preempted``)."""

KILL_GRACE_S = 5.0
"""How long stray processes get between SIGTERM and SIGKILL once the run is over."""

RUN_TAG_ENV = "PYTHON_HP_RUN"
"""The run's tag, in the environment of every process of the run on every node. Its name starts
with PYTHON because deepspeed's pdsh runner exports only such variables (and NCCL_*, MLFLOW*,
UCX*, MV2*) to the hosts; Python itself ignores the name."""

NODES_ENV = "PYTHON_HP_RUN_NODES"
"""Set ("1") in the environment of every process of a run whose supervisor reaches its hosts
(``--hostfile``): a rank there records a save-and-stop on its host even when the supervisor's
pass has not reached that host yet (another node's rank got the signal first)."""

REMOTE_PASS_S = 2.0
"""How often, after a stop request, the hosts are searched again for ranks not yet signalled."""

REMOTE_TIMEOUT_S = 60.0
"""How long one pass over the hosts (ssh included) may take before it is abandoned."""

SUPERVISOR_MODULE = "hp_deepspeed.launching.supervise"

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: orphans go to init, as without this process
        return False


ENTRY_SCRIPT = os.path.join("hp_deepspeed", "launching", "entry.py")
"""launching/entry.py, which runs a module for a launcher that starts only script files
(deepspeed's mpich runner): ``python [options] .../hp_deepspeed/launching/entry.py MODULE ...``."""


def is_rank(argv: list[str], module: str) -> bool:
    """Whether ``argv`` is a Python interpreter running ``module`` as a rank: ``python [options]
    -m MODULE ...``, or ``python [options] .../hp_deepspeed/launching/entry.py MODULE ...``. A
    launcher that merely names the module (``torchrun ... -m MODULE``, ``deepspeed --module
    MODULE``, ``python -m deepspeed.launcher.launch ... --module MODULE``, deepspeed's
    ``launcher_helper.py ... entry.py MODULE``) has a script or another module before it, so it
    is not a rank."""
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
    return i + 1 < len(argv) and argv[i].endswith(os.sep + ENTRY_SCRIPT) and argv[i + 1] == module


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


def node_status_dir(tag: str) -> str:
    """Where the ranks of run ``tag`` on this host record a save-and-stop that the supervisor of
    another host asked for (host name included: /tmp may be shared between nodes)."""
    return os.path.join(tempfile.gettempdir(), f"hp-deepspeed-run-{tag}-{socket.gethostname()}")


SAVED_PREFIX, SAVING_PREFIX = "rank-", "saving-"
"""Names of a rank's records in its status folder: ``rank-PID`` once it saved and stops,
``saving-PID`` from the moment the ranks agreed to stop until then."""


def _status_folder() -> str:
    """In a rank: the folder where it records a stop for the supervisor, or "" when none watches."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if folder and os.path.isdir(folder):
        return folder
    # A rank on another host than the supervisor: the folder of the run on this host, which the
    # supervisor's last pass counts. It may stop before a pass made the folder: the ranks agree
    # on the stop, and another host's rank may have been signalled first.
    tag = os.environ.get(RUN_TAG_ENV)
    folder = node_status_dir(tag) if tag else ""
    if folder and os.environ.get(NODES_ENV) == "1":
        os.makedirs(folder, exist_ok=True)
    return folder if folder and os.path.isdir(folder) else ""


def record_saving() -> None:
    """In a rank, once the ranks agreed to stop and before the save: tells the supervisor that
    this rank is saving, so that a launcher exiting meanwhile (the deepspeed runner sent a signal
    itself) does not get it killed ``KILL_GRACE_S`` later; it gets the stop timeout instead."""
    try:
        folder = _status_folder()
        if folder:
            open(os.path.join(folder, f"{SAVING_PREFIX}{os.getpid()}"), "w").close()
    except OSError:
        pass  # without the record the rank is merely given less time


def record_preempted(exit_code: int) -> int:
    """In a rank: the exit code to give the launcher. Under a supervisor a save-and-stop is
    recorded for it and reported to the launcher as success; otherwise ``exit_code`` unchanged."""
    if exit_code != EXIT_PREEMPTED:
        return exit_code
    folder = _status_folder()
    if not folder:
        return exit_code
    with open(os.path.join(folder, f"{SAVED_PREFIX}{os.getpid()}"), "w") as f:
        f.write(str(exit_code))
    try:
        os.remove(os.path.join(folder, f"{SAVING_PREFIX}{os.getpid()}"))
    except OSError:
        pass
    return 0


def saved_count(folder: str) -> int:
    """How many ranks recorded a save-and-stop in ``folder``."""
    return len([n for n in os.listdir(folder) if n.startswith(SAVED_PREFIX)]) if os.path.isdir(folder) else 0


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def saving_ranks(folder: str) -> list[int]:
    """Ranks that recorded in ``folder`` that they are saving, and still run."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    pids = [n[len(SAVING_PREFIX):] for n in names if n.startswith(SAVING_PREFIX)]
    return [int(pid) for pid in pids if pid.isdigit() and _running(int(pid))]


def let_ranks_finish(ranks: Callable[[], list[int]], folder: str, grace: float, timeout: float,
                     idle: Callable[[], None] = lambda: time.sleep(0.1)) -> None:
    """Wait while ranks of the run still run after their launcher exited: ``grace`` seconds for
    them to stop or start saving, then as long as one of them is saving (``record_saving``), up to
    ``timeout`` seconds in all. A rank whose launcher died saves and stops by itself (its watch,
    or the launcher's own last signal); one that is neither stopping nor saving after ``grace``
    is stuck (a peer gone in the middle of a collective) and is not waited for."""
    start = time.monotonic()
    while ranks():
        waited = time.monotonic() - start
        if waited >= timeout or (waited >= grace and not saving_ranks(folder)):
            return
        idle()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- on a host of the run

def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rfind(b")") + 2:].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _under_supervisor(pid: int) -> bool:
    """Whether a supervisor (not an ``--on-node`` pass) on this host is an ancestor of ``pid``."""
    seen = set()
    pid = _parent(pid)
    while pid > 1 and pid not in seen:
        seen.add(pid)
        argv = _cmdline(pid)
        if SUPERVISOR_MODULE in argv and "--on-node" not in argv:
            return True
        pid = _parent(pid)
    return False


def run_processes(tag: str) -> list[int]:
    """Live processes on this host that carry run ``tag`` in their environment, except those
    below a supervisor on this host (it stops them itself) and the supervisor. By ancestry, not
    by ``HP_SUPERVISOR_DIR`` in the environment: MPICH's mpiexec passes its whole environment to
    the ranks on every host. "This host" is this process's UTS namespace (its host name, which
    also names the status folder): nodes that share one kernel's process table, as containers
    may, each see only their own ranks."""
    needle = f"{RUN_TAG_ENV}={tag}".encode()
    here = os.readlink("/proc/self/ns/uts")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if os.readlink(f"/proc/{entry}/ns/uts") != here:
                continue
        except (OSError, IndexError):
            continue
        if (needle in environ and state != b"Z" and SUPERVISOR_MODULE not in _cmdline(int(entry))
                and not _under_supervisor(int(entry))):
            found.append(int(entry))
    return found


def signal_node(tag: str, module: str, signum: int) -> int:
    """``--on-node signal``: the stop signal to each rank of the run on this host, once."""
    signalled = os.path.join(node_status_dir(tag), "signalled")
    os.makedirs(signalled, exist_ok=True)
    count = 0
    for pid in run_processes(tag):
        marker = os.path.join(signalled, str(pid))
        if is_rank(_cmdline(pid), module) and not os.path.exists(marker):
            open(marker, "w").close()
            _signal(pid, signum)
            count += 1
    print(f"signalled={count}", flush=True)
    return 0


def finish_node(tag: str, module: str, signum: int, timeout: float = 0.0) -> int:
    """``--on-node finish``: once ranks still saving here are done (``let_ranks_finish``, up to
    ``timeout`` seconds; none when ``signum`` is SIGKILL), how many ranks here recorded a
    save-and-stop; then nothing of the run is left on this host (``signum`` first, SIGKILL after
    ``KILL_GRACE_S``)."""
    folder = node_status_dir(tag)
    if signum != signal.SIGKILL and timeout > 0:
        def ranks() -> list[int]:
            return [pid for pid in run_processes(tag) if is_rank(_cmdline(pid), module)]

        # A rank no pass signalled gets the stop request now (SIGTERM: a second SIGINT would stop
        # it without a save); one that stops already takes a second SIGTERM as the same request.
        for pid in ranks():
            if not os.path.exists(os.path.join(folder, "signalled", str(pid))):
                _signal(pid, signal.SIGTERM)
        let_ranks_finish(ranks, folder, KILL_GRACE_S, timeout)
    saved = saved_count(folder)
    left = run_processes(tag)
    for pid in left:
        _signal(pid, signum)
    deadline = time.monotonic() + KILL_GRACE_S
    while run_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in run_processes(tag):
        _signal(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"saved={saved} stopped={len(left)}", flush=True)
    return 0


class Hosts:
    """The other hosts of a run, reached the way deepspeed's pdsh runner reaches them: pdsh over
    ssh with ``PDSH_SSH_ARGS_APPEND`` (and ``-p PORT`` for ``--ssh_port``), the same Python and
    working directory, the ``PYTHON*`` variables exported."""

    def __init__(self, hosts: list[str], module: str, tag: str, ssh_port: str | None) -> None:
        self.hosts, self.module, self.tag = hosts, module, tag
        # Without the tag: these pdsh and ssh processes are not the run's, and a pass on this
        # host (a hostfile may name it) must not stop them.
        self.env = {k: v for k, v in os.environ.items() if k not in (RUN_TAG_ENV, NODES_ENV)}
        self.env["PDSH_RCMD_TYPE"] = "ssh"
        if ssh_port:
            self.env["PDSH_SSH_ARGS_APPEND"] = f"{self.env.get('PDSH_SSH_ARGS_APPEND', '')} -p {ssh_port}"

    def command(self, *args: str) -> list[str]:
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted(os.environ.items())
                          if k.startswith("PYTHON") and k not in (RUN_TAG_ENV, NODES_ENV))
        remote = (f"{exports}cd {shlex.quote(os.getcwd())}; {shlex.quote(sys.executable)} -m "
                  f"{SUPERVISOR_MODULE} --module {shlex.quote(self.module)} "
                  f"--on-node {' '.join(map(shlex.quote, args))} --tag {self.tag}")
        return ["pdsh", "-S", "-w", ",".join(self.hosts), remote]

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self, signum: int, timeout: float = 0.0) -> int:
        """Every host's ``--on-node finish`` (ranks still saving there get up to ``timeout``
        seconds); the number of ranks that recorded a save."""
        proc = self.start("finish", "--signal", str(signum), "--timeout", f"{timeout:g}")
        try:
            out, err = proc.communicate(timeout=REMOTE_TIMEOUT_S + timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            print(f"hp-deepspeed: stopping the run on {','.join(self.hosts)} over pdsh: "
                  f"{(err or out).strip()[-500:]}", file=sys.stderr, flush=True)
        return sum(int(n) for n in re.findall(r"saved=(\d+)", out))


def read_hostfile(path: str) -> list[str]:
    """The host names of a deepspeed hostfile (``host slots=N`` lines, ``#`` comments)."""
    hosts = []
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if words and words[0] not in hosts:
                hosts.append(words[0])
    return hosts


class Supervisor:
    def __init__(self, command: list[str], module: str, stop_timeout: float, tag: str,
                 hosts: Hosts | None = None, launcher_forwards: int | None = None,
                 drop_line: Callable[[bytes], bool] | None = None) -> None:
        self.command, self.module, self.stop_timeout = command, module, stop_timeout
        self.drop_line = drop_line
        """Lines of the launcher's standard output left out (None: its output is not touched)."""
        self.copier: threading.Thread | None = None
        self.tag, self.hosts, self.launcher_forwards = tag, hosts, launcher_forwards
        self.launcher_told = False
        """Whether the launcher got ``launcher_forwards`` (it is sent once)."""
        self.remote_pass: subprocess.Popen | None = None
        """The ``--on-node signal`` pass over the hosts in flight, if any."""
        self.remote_pass_at = 0.0
        self.forced = False
        """Whether the run was killed (second interrupt, stop timeout): what is left gets SIGKILL."""
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
            self.forced = True
            self._kill_all(signal.SIGKILL)

    def _kill_all(self, signum: int) -> None:
        for pid in descendants(os.getpid()):
            _signal(pid, signum)

    def _forward_to_ranks(self) -> None:
        if self.launcher_forwards is not None and not self.launcher_told and self.child is not None:
            self.launcher_told = True
            _signal(self.child.pid, self.launcher_forwards)
        for pid in descendants(os.getpid()):
            if pid not in self.signalled and is_rank(_cmdline(pid), self.module):
                self.signalled.add(pid)
                _signal(pid, self.requested)
        if self.hosts is None:
            return
        if self.remote_pass is not None:
            if self.remote_pass.poll() is None:
                if time.monotonic() - self.remote_pass_at < REMOTE_TIMEOUT_S:
                    return
                self.remote_pass.kill()
            self.remote_pass.communicate()
            self.remote_pass = None
        if time.monotonic() - self.remote_pass_at >= REMOTE_PASS_S:
            self.remote_pass_at = time.monotonic()
            self.remote_pass = self.hosts.start("signal", "--signal", str(int(self.requested)))

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
        env = dict(os.environ, **{STATUS_DIR_ENV: self.status_dir, RUN_TAG_ENV: self.tag})
        if self.hosts is not None:
            env[NODES_ENV] = "1"
        self.child = subprocess.Popen(self.command, start_new_session=True, env=env,
                                      stdout=subprocess.PIPE if self.drop_line else None,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if self.drop_line:
            self.copier = threading.Thread(target=self._copy_output, args=(self.child.stdout,), daemon=True)
            self.copier.start()
        launcher_status = None
        while launcher_status is None:
            if self.requested is not None and self.killed_by is None:
                self._forward_to_ranks()
                if time.monotonic() - self.requested_at > self.stop_timeout:
                    print(f"hp-deepspeed: the ranks did not stop within HP_STOP_TIMEOUT={self.stop_timeout:g}s "
                          "of the signal; killing them", file=sys.stderr, flush=True)
                    self.forced = True
                    self._kill_all(signal.SIGKILL)
            launcher_status = self._reap()
            if launcher_status is None:
                time.sleep(0.2)
        if self.remote_pass is not None:  # a pass over the hosts is this process's, not a stray of the run
            try:
                self.remote_pass.communicate(timeout=REMOTE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.remote_pass.kill()
                self.remote_pass.communicate()
        self._clean_up()
        if self.copier is not None:  # the output of the run's last processes, up to the pipe's end
            self.copier.join(timeout=KILL_GRACE_S)
        saved_remote = 0
        if self.hosts is not None:
            saved_remote = self.hosts.finish(signal.SIGKILL if self.forced else signal.SIGTERM,
                                              0.0 if self.forced else self._time_left())
        if self.killed_by is not None:
            return 128 + self.killed_by
        saved = saved_count(self.status_dir) + saved_remote
        if launcher_status != 0 and saved:
            # The launcher was killed or failed (the deepspeed runner sent a signal itself exits 1
            # while its ranks save): the ranks' records say the checkpoint was written.
            how = (f"was killed by signal {-launcher_status}" if launcher_status < 0
                   else f"exited with {launcher_status}")
            print(f"hp-deepspeed: the launcher {how}; {saved} rank(s) saved a checkpoint and stopped "
                  f"(exit {EXIT_PREEMPTED}: resume with --resume auto)", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        if launcher_status < 0:
            return 128 - launcher_status
        if launcher_status == 0 and saved:
            return EXIT_PREEMPTED
        return launcher_status

    def _time_left(self) -> float:
        """Seconds the ranks may still take to save: the stop timeout, from the stop request."""
        since = time.monotonic() - self.requested_at if self.requested is not None else 0.0
        return max(0.0, self.stop_timeout - since)

    def _copy_output(self, pipe) -> None:
        """The launcher's standard output to this process's, line by line, without ``drop_line``
        lines. The pipe is drained to its end even when this process's output is gone (a closed
        pager): a full pipe would stop the run."""
        out = sys.stdout.buffer
        for line in iter(pipe.readline, b""):
            if out is not None and not self.drop_line(line):
                try:
                    out.write(line)
                    out.flush()
                except (BrokenPipeError, OSError):
                    out = None
        pipe.close()

    def _clean_up(self) -> None:
        """Nothing of the run outlives this process: ranks still saving are let finish (not after
        a forced stop), then strays get SIGTERM, then SIGKILL."""
        if not self.forced:
            def ranks() -> list[int]:
                return [pid for pid in descendants(os.getpid()) if is_rank(_cmdline(pid), self.module)]

            for pid in ranks():  # as on the hosts (finish_node)
                if pid not in self.signalled:
                    self.signalled.add(pid)
                    _signal(pid, signal.SIGTERM)
            let_ranks_finish(ranks, self.status_dir, KILL_GRACE_S, self._time_left(), idle=self._reap_a_while)
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

    def _reap_a_while(self) -> None:
        self._reap()
        time.sleep(0.1)


def _option(command: list[str], name: str) -> str | None:
    """The value of launcher option ``name`` (``--name V`` or ``--name=V``) in ``command``."""
    for i, word in enumerate(command):
        if word == name and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hp_deepspeed.launching.supervise", description=__doc__.split("\n")[0])
    parser.add_argument("--module", default=os.environ.get("HP_MODULE", "hp_deepspeed.cli"),
                        help="the module every rank runs (default: $HP_MODULE or hp_deepspeed.cli)")
    parser.add_argument("--hostfile", help="the run's deepspeed hostfile: its hosts are reached over pdsh "
                        "to stop the ranks there (launch/multinode.sh gives it for every runner when pdsh is installed)")
    parser.add_argument("--launcher-forwards", metavar="SIGNAL", help="a stop request goes to the launcher as "
                        "this signal, which it forwards to every rank (srun: USR1), besides the ranks below this process")
    parser.add_argument("--drop-node-launcher-info", action="store_true", help="leave DeepSpeed's per-node "
                        "launcher info lines out of the output (launch/multinode.sh: its pdsh runner does not pass "
                        "--log_level on to the nodes)")
    parser.add_argument("--on-node", choices=("signal", "finish"), help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--signal", type=int, default=int(signal.SIGTERM), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- LAUNCHER [ARGS...]")
    args = parser.parse_args(argv)
    if args.on_node:
        if not args.tag:
            parser.error("--on-node needs --tag")
        return (signal_node(args.tag, args.module, args.signal) if args.on_node == "signal"
                else finish_node(args.tag, args.module, args.signal, args.timeout))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no launcher command given")
    try:
        stop_timeout = float(os.environ.get("HP_STOP_TIMEOUT", "300"))
    except ValueError:
        parser.error(f"HP_STOP_TIMEOUT={os.environ['HP_STOP_TIMEOUT']!r}: expected seconds")
    # A tag given by whoever started this (a test, a wrapper that wants to find the run) is kept.
    tag = os.environ.get(RUN_TAG_ENV) or uuid.uuid4().hex
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        parser.error(f"{RUN_TAG_ENV}={tag!r}: expected letters, digits, '_', '.' or '-'")
    hosts = None
    if args.hostfile:
        try:
            names = read_hostfile(args.hostfile)
        except OSError as err:
            parser.error(f"--hostfile {args.hostfile}: {err.strerror}")
        if not names:
            parser.error(f"--hostfile {args.hostfile}: no host in it (expected lines \"host slots=N\")")
        # deepspeed runs a one-host hostfile on this machine, without pdsh, unless --force_multi;
        # an MPI runner's mpirun starts the ranks of this machine below itself, without ssh.
        on_this_machine = set(names) <= {"localhost", "127.0.0.1", socket.gethostname()}
        mpi_here = on_this_machine and _option(command, "--launcher") in ("openmpi", "mpich")
        if (len(names) > 1 or "--force_multi" in command) and not mpi_here:
            if not shutil.which("pdsh"):
                parser.error("--hostfile: pdsh is not on PATH (it reaches the hosts to stop the ranks there)")
            hosts = Hosts(names, args.module, tag, _option(command, "--ssh_port"))
    forwards = None
    if args.launcher_forwards:
        name = args.launcher_forwards.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in ("SIGUSR1", "SIGUSR2"):
            parser.error(f"--launcher-forwards {args.launcher_forwards}: expected USR1 or USR2 "
                         "(a signal the launcher passes on without acting on it)")
        forwards = int(getattr(signal, name))
    try:
        drop_line = None
        if args.drop_node_launcher_info:
            from hp_deepspeed.compat.deepspeed import is_node_launcher_info as drop_line
        return Supervisor(command, args.module, stop_timeout, tag, hosts, forwards, drop_line).run()
    except FileNotFoundError as err:
        print(f"hp-deepspeed: error: cannot start {command[0]!r}: {err.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
