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
