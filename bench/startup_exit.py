"""Time from launch to step 1, and from the last save to the prompt, of a tiny run through launch/local.sh.

    python -m bench.startup_exit [--ranks 1 2] [--signal-at 3] [--rounds 1]

Starts ``launch/local.sh train`` on the tests' tiny job (CPU, ZeRO-3), stamps every output line
with the seconds since the launch, sends SIGTERM to the script once step ``--signal-at`` is
logged, and prints: the moment of each milestone (the ranks' process group up, the start line,
step 1, the save, the exit), the silent gaps longer than 3 s before step 1 with the line that
ended each, and the machine's load average before and after each round, since on a shared machine
the numbers move with it. Rounds alternate between the rank counts. About a minute per round on
2 idle cores.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "tests" / "training" / "tiny_job.yaml"


def one_round(ranks: int, signal_at: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="hp-startup-"))
    env = dict(os.environ, HP_NUM_GPUS=str(ranks), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    cmd = [str(REPO / "launch" / "local.sh"), "train", "--config", str(JOB), f"run.dir={run_dir}",
           "training.steps=1000", "checkpoint.interval=1000", "training.log_every=1"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:
        now = time.monotonic() - started
        lines.append((now, line.rstrip()))
        if re.search(rf"trainer: step {signal_at} ", line):
            os.kill(proc.pid, signal.SIGTERM)
    proc.wait()
    ended = time.monotonic() - started

    def first(pattern: str) -> float | None:
        return next((t for t, text in lines if re.search(pattern, text)), None)

    step1 = first(r"trainer: step 1 ")
    saved = first(r"saved checkpoint")
    gaps, previous = [], 0.0
    for t, text in lines:
        if step1 is not None and t > step1:
            break
        if t - previous > 3.0:
            gaps.append((previous, t, text[:110]))
        previous = t
    return {"exit_code": proc.returncode, "group_up": first(r"process group of \d+ rank"),
            "start_line": first(r"training on \d+ rank"), "step1": step1,
            "saved": saved, "exit": ended, "save_to_exit": None if saved is None else ended - saved, "gaps": gaps}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--signal-at", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    for n in range(args.rounds):
        for ranks in args.ranks:
            load = os.getloadavg()[0]
            r = one_round(ranks, args.signal_at)
            print(f"round {n + 1}, {ranks} rank(s): exit {r['exit_code']}; group up at {seconds(r['group_up'])}, "
                  f"start line at {seconds(r['start_line'])}, step 1 at {seconds(r['step1'])}, "
                  f"saved at {seconds(r['saved'])}, exit at {seconds(r['exit'])}: last save -> exit "
                  f"{seconds(r['save_to_exit'])} (1-min load {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
            for begin, end, text in r["gaps"]:
                print(f"  silent {end - begin:4.1f}s ({begin:.1f} -> {end:.1f}s), ended by: {text}", flush=True)
    print(f"load average (1/5/15 min) at the end: {os.getloadavg()}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
