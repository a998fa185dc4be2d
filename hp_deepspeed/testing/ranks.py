"""Multi-process test harness: N real ranks on the CPU (gloo), and real launcher commands.

Two entry points:

``run_ranks("pkg.module:function", world_size=2, timeout=120, args=(...))``
    starts ``world_size`` fresh Python processes with the torch.distributed environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), initialises a
    gloo process group in each, calls the function with ``args`` and returns the list of
    per-rank return values (anything picklable).

``run_command([...], timeout=300)``
    runs a launcher command line (``deepspeed``, ``mpirun``, ``sbatch`` helpers) in its own
    process group.

``tagged_processes(name, tag)`` finds every live process of a run that a test marked with
an environment variable, whatever started it: what a test checks is gone after a stop.

Both fail loudly: when a rank crashes the others are killed after a short grace period (a
surviving rank would otherwise sit in a collective forever), and on timeout the whole process
group is killed. Either way ``DistributedTestError`` carries every rank's output tail, so a
hung collective never hangs CI and never fails silently.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

OUTPUT_TAIL_CHARS = 6000
CRASH_GRACE_SECONDS = 10.0


class DistributedTestError(RuntimeError):
    """A rank failed or the group timed out; the message holds each rank's output."""


def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tagged_processes(name: str, tag: str, pids: Sequence[int] | None = None) -> list[int]:
    """The live (not zombie) processes, among ``pids`` or all of this machine's but this one,
    whose environment holds ``name=tag``."""
    needle = f"{name}={tag}".encode()
    if pids is None:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) != os.getpid()]
    found = []
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ and state != b"Z":
            found.append(pid)
    return found


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL_CHARS else "...\n" + text[-OUTPUT_TAIL_CHARS:]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the repo importable, one thread per rank on 2 cores."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The tests never reach a model hub; fail fast instead of retrying the network.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if extra:
        env.update(extra)
    return env


@dataclass
class CommandResult:
    returncode: int
    output: str


def run_command(
    cmd: Sequence[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> CommandResult:
    """Run ``cmd`` in a new process group; kill the group and raise on timeout (or failure)."""
    with tempfile.TemporaryFile("w+") as out:
        # No input: nothing a test launches reads stdin, and none should wait on pytest's.
        proc = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=base_env(env),
            cwd=cwd, start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.seek(0)
            raise DistributedTestError(
                f"command timed out after {timeout:.0f}s and was killed: {' '.join(cmd)}\n"
                f"--- output ---\n{_tail(out.read())}"
            ) from None
        finally:
            _kill_group(proc)  # stray children (launcher ranks) never outlive the call
        out.seek(0)
        result = CommandResult(proc.returncode, out.read())
    if check and result.returncode != 0:
        raise DistributedTestError(
            f"command failed with exit code {result.returncode}: {' '.join(cmd)}\n"
            f"--- output ---\n{_tail(result.output)}"
        )
    return result


def run_ranks(
    target: str,
    world_size: int,
    timeout: float = 180.0,
    args: Sequence[Any] = (),
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``target`` ("module:function") in ``world_size`` gloo ranks; return their results."""
    if ":" not in target:
        raise ValueError(f"target {target!r}: expected 'module:function'")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hp-ranks-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "args.pkl").write_bytes(pickle.dumps(tuple(args)))
        procs, logs = [], []
        for rank in range(world_size):
            rank_env = base_env(env)
            rank_env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            )
            log = tmp_path / f"rank{rank}.log"
            logs.append(log)
            with log.open("w") as fh:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "hp_deepspeed.testing.rank_entry", target, tmp],
                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=rank_env,
                    start_new_session=True,
                ))
        deadline = time.monotonic() + timeout
        first_failure_at = None
        reason = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                if any(c != 0 for c in codes):
                    reason = f"ranks exited with codes {codes}"
                break
            if any(c not in (None, 0) for c in codes):
                first_failure_at = first_failure_at or time.monotonic()
                if time.monotonic() - first_failure_at > CRASH_GRACE_SECONDS:
                    reason = f"a rank failed (exit codes {codes}); the others were killed"
                    break
            if time.monotonic() > deadline:
                hung = [r for r, c in enumerate(codes) if c is None]
                reason = f"timed out after {timeout:.0f}s; ranks {hung} still running were killed"
                break
            time.sleep(0.1)
        for proc in procs:
            _kill_group(proc)
        if reason is not None:
            outputs = "\n".join(
                f"--- rank {r} (exit {p.returncode}) ---\n{_tail(_read(log))}"
                for r, (p, log) in enumerate(zip(procs, logs))
            )
            raise DistributedTestError(f"{target} on {world_size} ranks: {reason}\n{outputs}")
        return [pickle.loads((tmp_path / f"result{r}.pkl").read_bytes()) for r in range(world_size)]
