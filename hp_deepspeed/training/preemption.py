"""Preemption: turn SIGTERM / SIGUSR1 / SIGINT, or the exit of the rank's launcher, into "every
rank saves at the same step, then exit 75".

Schedulers warn before killing a job: Slurm sends SIGTERM at the time limit or on preemption
(and SIGUSR1 ahead of time with ``--signal=USR1@120``), Kubernetes sends SIGTERM, and a person
presses Ctrl-C (SIGINT). All three keep the work: the run saves and stops. A second SIGINT is a
person who does not want to wait: the rank exits at once with 130 and saves nothing. A launcher
that dies without passing a signal on (the deepspeed runner started by hand and sent SIGTERM)
leaves its ranks without anyone to stop them; a watch on it (launching/launcher_watch.py) raises
the same flag as a signal, so they save and stop too. The signal may
reach only some ranks, at different moments, so acting on it locally would make one rank enter
``save_checkpoint`` (a collective) while the others keep training: a deadlock. Instead:

 * the handler only records the signal number (nothing else is safe inside a handler: logging or
   I/O could deadlock on a lock the interrupted code holds);
 * at a step boundary every rank calls ``should_stop(step)``, which all-reduces the flag with MAX,
   so all ranks see the same answer at the same step. The reduction runs on the host in the
   background and is read at the next step boundary: the ranks stop one step after the signal,
   and no step waits for the GPU to finish so that a flag can be read;
 * the trainer then saves, and exits with ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL`` from sysexits.h):
   "preempted, checkpoint written, requeue me". Launch scripts requeue on 75 and treat every other
   non-zero code as a real failure.

    handler = PreemptionHandler(PreemptionConfig())
    handler.install()
    for step in ...:
        train_step()
        if handler.should_stop(step):
            manager.save(engine, step, state)
            handler.restore()
            sys.exit(EXIT_PREEMPTED)
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

from hp_deepspeed.launching import collectives
from hp_deepspeed.launching.launcher_watch import Process, is_alive, launcher_name, watch_launcher
from hp_deepspeed.launching.supervise import record_saving

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run that stopped on a preemption signal after writing its checkpoint (EX_TEMPFAIL)."""

EXIT_INTERRUPTED = 130
"""Exit code of a rank stopped by a second Ctrl-C, without a save (128 + SIGINT, as a shell reports it)."""


@dataclass
class PreemptionConfig:
    """Which signals mean "save and stop", and how often the ranks agree on it."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    """Signal names that request a save-and-exit; their previous handlers are restored by ``restore()``."""

    check_every: int = 1
    """Send the flag every this many steps. One background all-reduce of one scalar per step, on
    the host, is noise next to a T5 step; raise this only if steps are tiny. Must be the same on
    every rank."""

    def __post_init__(self) -> None:
        if self.check_every < 1:
            raise ValueError(f"preemption.check_every must be >= 1, got {self.check_every}")
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"preemption.signals: {name!r} is not a signal name on this platform")


def first_rank_by_environment() -> bool:
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(name):
            return os.environ[name] == "0"
    return True


class PreemptionHandler:
    """Records preemption signals and turns them into a stop decision every rank shares."""

    def __init__(self, config: PreemptionConfig | None = None) -> None:
        self.config = config or PreemptionConfig()
        self.received: int | None = None
        """Number of the first signal received on this rank, None while none has arrived."""
        self.launcher_gone: Process | None = None
        """The launcher this rank ran under, once the watch saw it exit (None while it runs)."""
        self.stop_step: int | None = None
        """Step at which the ranks agreed to stop, None until they did."""
        self.speaks = first_rank_by_environment()
        """Whether this rank prints the lines a person reads: rank 0 (the trainer sets it once the
        process group is up; until then the launcher's environment says)."""
        self._previous: dict[int, object] = {}
        self._agreement = None
        """The flag agreement started at the last check, read at the next call."""
        self._watch = None

    def _say(self, text: str) -> None:
        # os.write, not logging: a handler may run while the interrupted code holds logging's lock.
        if self.speaks:
            os.write(2, f"hp-deepspeed: {text}\n".encode())

    def _on_signal(self, signum, frame) -> None:
        # The first signal wins so the log names the real cause.
        if self.received is None:
            self.received = signum
            # Under the launch scripts' supervisor, which forwards the signal, it has said this
            # already; ranks on other nodes know it by the run tag (launching/supervise.py).
            if signum == signal.SIGINT and not (os.environ.get("HP_SUPERVISOR_DIR") or os.environ.get("PYTHON_HP_RUN")):
                self._say("interrupted: saving a checkpoint at the next step, then stopping "
                          "(Ctrl-C again stops at once without saving)")
        elif signum == signal.SIGINT:
            self._say("interrupted again: stopping now without saving")
            os._exit(EXIT_INTERRUPTED)

    def _on_launcher_gone(self, launcher: Process) -> None:
        # From the watch's thread: one assignment, read by should_stop on the main thread.
        self.launcher_gone = launcher

    @property
    def requested(self) -> bool:
        """Whether this rank has a reason to stop: a signal, or its launcher's exit."""
        return self.received is not None or self.launcher_gone is not None

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only: a Python restriction on ``signal.signal``) and
        start watching the launcher this rank runs under, if any."""
        for name in self.config.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if self._watch is None:
            self._watch = watch_launcher(self._on_launcher_gone)
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before ``install()``; stop the launcher watch."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def should_stop(self, step: int) -> bool:
        """Collective at a step boundary: True on every rank, at the same step, once any rank has
        received a signal.

        Every rank must call it at every step with the same ``step``. The ranks' flags are
        reduced on the host in the background (``collectives.start_flag_agreement``) and the
        answer is read at the next call, so the ranks agree one step after the signal arrived and
        no step waits for the GPU to tell. Alone, a rank decides at once. A flag is sent every
        ``check_every`` steps.
        """
        if self.stop_step is not None:
            return True
        if self._agreement is not None:
            agreed, self._agreement = self._agreement(), None
            if agreed:
                return self._stop(step)
        if step % self.config.check_every == 0:
            agreement = collectives.start_flag_agreement(self.requested, "max")
            if collectives.world_size() == 1:
                return bool(agreement()) and self._stop(step)
            self._agreement = agreement
        return False

    def _stop(self, step: int) -> bool:
        self.stop_step = step
        record_saving()  # a supervisor lets a saving rank finish even if its launcher exits meanwhile
        if self.received is None and self.launcher_gone is None and self._watch is not None:
            # Another rank's watch may have fired first (each polls on its own clock): look now,
            # so the line names the launcher when it is gone here too.
            if not is_alive(self._watch.launcher):
                self.launcher_gone = self._watch.launcher
        if self.speaks and self.received is None and self.launcher_gone is not None:
            launcher = self.launcher_gone
            log.warning("the launcher %s (pid %d) exited: all ranks save at step %d and stop",
                        launcher_name(launcher.argv), launcher.pid, step)
        elif self.speaks:
            cause = signal.Signals(self.received).name if self.received is not None else "another rank's signal"
            log.warning("preemption requested (%s): all ranks save at step %d and stop", cause, step)
        return True

    def finish(self, failing: bool = False) -> None:
        """At the end of training, before the process group goes: wait for an agreement still in
        flight, so no collective is left running on it. Not when ``failing``: a rank that raised
        may not have started its part, and waiting would hang until the collective timeout."""
        agreement, self._agreement = self._agreement, None
        if agreement is not None and not failing:
            agreement()
