"""Ctrl-C in a rank: the first one asks for a save at the next step, a second one exits at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BODY = r"""
import os, signal, sys, time
from hp_deepspeed.training.preemption import PreemptionHandler
handler = PreemptionHandler().install()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("recorded", signal.Signals(handler.received).name, flush=True)
if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("still running", flush=True)
"""


def run(mode: str, **supervisor) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("HP_SUPERVISOR_DIR", None)
    env.pop("PYTHON_HP_RUN", None)
    env.update(supervisor)
    return subprocess.run([sys.executable, "-c", BODY, mode], capture_output=True, text=True, env=env, timeout=120)


def test_a_first_ctrl_c_is_recorded_as_a_stop_request_with_one_line():
    proc = run("once")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "recorded SIGINT"
    assert proc.stderr.count("interrupted: saving a checkpoint at the next step") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_ctrl_c_exits_130_at_once_without_a_traceback():
    proc = run("twice")
    assert proc.returncode == 130, proc.stderr
    assert "still running" not in proc.stdout
    assert "interrupted again: stopping now without saving" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("supervisor", [{"HP_SUPERVISOR_DIR": "/tmp/x"}, {"PYTHON_HP_RUN": "tag"}],
                         ids=["this node", "another node"])
def test_under_the_supervisor_a_rank_leaves_the_ctrl_c_line_to_it(supervisor):
    proc = run("once", **supervisor)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "recorded SIGINT"
    assert "interrupted" not in proc.stderr


def test_after_the_ranks_agreed_to_stop_the_stop_signals_are_ignored_not_handed_back(monkeypatch):
    """The checkpoint is written by then: a late stop signal, configured or default, must not kill
    the rank or raise KeyboardInterrupt. Without a stop, or after an error, the previous handlers
    come back."""
    import signal

    from hp_deepspeed.training.preemption import PreemptionConfig, PreemptionHandler

    monkeypatch.delenv("HP_SUPERVISOR_DIR", raising=False)
    names = ["SIGUSR2", "SIGTERM"]
    previous = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        idle = PreemptionHandler(PreemptionConfig(signals=names)).install()
        idle.restore()
        assert {name: signal.getsignal(getattr(signal, name)) for name in names} == previous

        stopping = PreemptionHandler(PreemptionConfig(signals=names)).install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stopping.should_stop(1)  # one rank alone decides at once
        stopping.restore(failing=True)  # a rank that raised: a signal must still end it
        assert {name: signal.getsignal(getattr(signal, name)) for name in names} == previous
        stopping.install()
        stopping.restore()
        assert all(signal.getsignal(getattr(signal, name)) is signal.SIG_IGN for name in names)
        os.kill(os.getpid(), signal.SIGUSR2)  # ignored: the test process lives on
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
