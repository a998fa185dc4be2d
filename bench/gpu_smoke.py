"""GPU smoke check: the main job's user paths, end to end, on this machine's first GPU.

    python -m bench.gpu_smoke [--out DIR] [--suites auto_bf16,zero3_bf16,zero2_bf16,zero3_offload_cpu]
    python -m bench.gpu_smoke --cpu [--stages train,eval]        # the same stages on the CPU (gloo)

One suite per DeepSpeed config, each of these stages, every one a real command with its own
timeout (as a user types them; world size 1 through ``launch/local.sh``):

``train``        a short HyperPrompt-Global run: an evaluation and two checkpoints
``kill_resume``  a longer run SIGKILLed after its next checkpoint, then ``--resume auto``,
                 which must continue from that checkpoint to the end
``eval``         ``hp-deepspeed eval --checkpoint auto`` under the launcher
``export``       ``hp-deepspeed export`` of the newest checkpoint
``predict``      ``hp-deepspeed predict`` from the export (``--device cuda`` on a GPU)

A stage whose input an earlier stage makes (all need ``train``; ``predict`` needs ``export``)
is FAIL, not run, when that stage failed or was not selected. Prints
one ``PASS``/``FAIL`` line per stage, writes ``smoke.json`` (and each stage's log) to ``--out``
(default ``$OUT`` or ``bench/results/gpu_smoke``), and exits 1 when any stage failed.
``--cpu`` runs with ``HP_DEVICE=cpu`` and the CPU test config, so the stages do not rot on
machines without a GPU (tests/training/test_gpu_smoke.py runs part of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hp_deepspeed.testing.ranks import free_port

REPO = Path(__file__).resolve().parents[1]
# auto_bf16 first: the default config (on one GPU, stage 1 with bf16: DeepSpeed's BF16_Optimizer).
GPU_SUITES = ("auto_bf16", "zero3_bf16", "zero2_bf16", "zero3_offload_cpu")
CPU_SUITES = ("zero3_cpu_test",)
STAGES = ("train", "kill_resume", "eval", "export", "predict")
NEEDS = {"kill_resume": ("train",), "eval": ("train",), "export": ("train",), "predict": ("export",)}
# The job: the demo model and two bundled tasks, small enough that start-up dominates.
JOB = [
    "model.name_or_path=configs/models/t5-demo", "model.load_weights=false",
    "conditioning.variant=hyperprompt_global", "conditioning.prompt_length=4", "conditioning.bottleneck=8",
    "data.tasks=[synthetic/first,glue/rte]", "data.max_input_length=48", "data.max_target_length=12",
    "training.micro_batch_size=4", "training.log_every=1", "training.progress_bar=false",
    "training.tensorboard=false", "eval.batch_size=16", "eval.max_examples_per_task=16",
    "eval.max_new_tokens=4", "checkpoint.interval=2", "checkpoint.keep_last=2",
    # The asynchronous save's CUDA snapshot has no CPU test: every smoke save goes through it.
    "checkpoint.async_save=always",
]
# The killed run aims at RESUME_STEPS and is killed once step KILL_AFTER is saved: far enough
# ahead that even a fast GPU cannot finish before the kill lands.
TRAIN_STEPS, RESUME_STEPS, KILL_AFTER = 4, 16, 6


@dataclass
class Stage:
    name: str
    ok: bool
    seconds: float
    detail: str


class StageFailed(Exception):
    """The stage ran but did not do what it must; the message says what."""


def run(cmd: list[str], env: dict, log: Path, timeout: float) -> None:
    """Run ``cmd`` in its own process group, output to ``log``; raise StageFailed unless rc 0."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise StageFailed(f"timed out after {timeout:.0f}s (see {log.name})") from None
    if rc != 0:
        raise StageFailed(f"exit code {rc}: {tail(log)}")


def tail(log: Path, lines: int = 3) -> str:
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-600:]


def metrics(run_dir: Path, kind: str) -> dict[int, dict]:
    from hp_deepspeed.training.metrics_log import read_metrics

    path = run_dir / "metrics.jsonl"
    return {r["step"]: r for r in read_metrics(path) if r["kind"] == kind} if path.is_file() else {}


def latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


class Suite:
    """The stages of one DeepSpeed config, sharing one run directory."""

    def __init__(self, name: str, out: Path, env: dict, cpu: bool, timeout: float):
        self.name, self.env, self.cpu, self.timeout = name, env, cpu, timeout
        self.dir = out / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.run_dir = self.dir / "run"

    def train_cmd(self, steps: int, *extra: str) -> list[str]:
        return ["bash", "launch/local.sh", "train", *JOB, f"run.dir={self.run_dir}",
                f"training.ds_config=ds_configs/{self.name}.json", f"training.steps={steps}", *extra]

    def cli(self, *args: str) -> list[str]:
        return [self.env["PYTHON"], "-m", "hp_deepspeed.cli", *args]

    def stage_train(self, log: Path) -> str:
        run(self.train_cmd(TRAIN_STEPS, f"eval.every={TRAIN_STEPS}"), self.env, log, self.timeout)
        saved = sorted(p.name for p in (self.run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())
        evals = metrics(self.run_dir, "eval")
        if saved != ["step-2", "step-4"] or TRAIN_STEPS not in evals:
            raise StageFailed(f"expected checkpoints step-2, step-4 and an eval at step {TRAIN_STEPS}; "
                              f"got {saved} and evals at {sorted(evals)}")
        loss = metrics(self.run_dir, "train")
        return f"loss {loss[1]['loss']:.3f} -> {loss[TRAIN_STEPS]['loss']:.3f}, checkpoints {saved}, eval at {TRAIN_STEPS}"

    def stage_kill_resume(self, log: Path) -> str:
        self._train_until_killed(log)
        killed_at = latest(self.run_dir)
        if killed_at == f"step-{RESUME_STEPS}":
            raise StageFailed(f"the run reached step {RESUME_STEPS} before the SIGKILL; nothing left to resume")
        started = time.time()
        run(self.train_cmd(RESUME_STEPS, "--resume", "auto"), self.env, log, self.timeout)
        resumed = sorted(s for s, r in metrics(self.run_dir, "train").items() if r["time"] >= started)
        expected = list(range(int(killed_at.split("-")[1]) + 1, RESUME_STEPS + 1))
        if latest(self.run_dir) != f"step-{RESUME_STEPS}" or resumed != expected:
            raise StageFailed(f"after SIGKILL at {killed_at}: resumed steps {resumed}, expected {expected}; "
                              f"latest {latest(self.run_dir)}")
        return f"killed after {killed_at}, resumed steps {expected[0]}..{expected[-1]}"

    def _train_until_killed(self, log: Path) -> None:
        with log.open("a") as out:
            cmd = self.train_cmd(RESUME_STEPS, "--resume", "auto")
            out.write(f"$ {' '.join(cmd)}  # SIGKILLed once step-{KILL_AFTER} is complete\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + self.timeout
            target = self.run_dir / "checkpoints" / f"step-{KILL_AFTER}" / "COMPLETE"
            while not target.is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not target.is_file():
            raise StageFailed(f"step-{KILL_AFTER} never completed before the kill: {tail(log)}")

    def stage_eval(self, log: Path) -> str:
        before = set(metrics(self.run_dir, "eval"))
        started = time.time()
        run(["bash", "launch/local.sh", "eval", *JOB, f"run.dir={self.run_dir}",
             f"training.ds_config=ds_configs/{self.name}.json", "--checkpoint", "auto"], self.env, log, self.timeout)
        fresh = [s for s, r in metrics(self.run_dir, "eval").items() if r["time"] >= started]
        if not fresh:
            raise StageFailed(f"no evaluation record written (had {sorted(before)})")
        return f"evaluated {latest(self.run_dir)}"

    def stage_export(self, log: Path) -> str:
        run(self.cli("export", "--run-dir", str(self.run_dir), "--out", str(self.dir / "export")),
            self.env, log, self.timeout)
        if not (self.dir / "export" / "export.json").is_file():
            raise StageFailed("no export.json written")
        return f"exported {latest(self.run_dir)}"

    def stage_predict(self, log: Path) -> str:
        rows = REPO / "hp_deepspeed" / "bundled" / "data" / "synthetic" / "first" / "validation.jsonl"
        sample = self.dir / "rows.jsonl"
        sample.write_text("".join(rows.read_text().splitlines(keepends=True)[:8]))
        out = self.dir / "predictions.jsonl"
        cmd = self.cli("predict", "--export", str(self.dir / "export"), "--task", "synthetic/first",
                       "--input", str(sample), "--device", "cpu" if self.cpu else "cuda")
        with out.open("w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.PIPE, text=True,
                                  timeout=self.timeout)
        log.write_text(proc.stderr)
        if proc.returncode != 0:
            raise StageFailed(f"exit code {proc.returncode}: {tail(log)}")
        answers = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        if len(answers) != 8:
            raise StageFailed(f"{len(answers)} predictions for 8 rows")
        return f"8 predictions, e.g. {answers[0]['prediction']!r}"


def environment(cpu: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    env.update(HP_NUM_GPUS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(env["PYTHON"]).parent), env.get("PATH", "")])
    # A free rendezvous port unless one is given: launch/local.sh's default, 29500, may be held by
    # another run on this machine (a training job beside the check, a test beside this one).
    env.setdefault("MASTER_PORT", str(free_port()))
    if cpu:
        env.update(HP_DEVICE="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    return env


def run_suite(suite: Suite, stages: list[str]) -> list[Stage]:
    results: list[Stage] = []
    for name in stages:
        full = f"{suite.name}/{name}"
        needs = NEEDS.get(name, ())
        failed_before = [r.name for r in results if not r.ok and r.name.split("/")[1] in needs]
        failed_before += [f"{suite.name}/{n}" for n in needs if n not in stages]  # asked without its input
        started = time.monotonic()
        if failed_before:
            result = Stage(full, False, 0.0, f"not run: needs {', '.join(failed_before)}")
        else:
            try:
                detail = getattr(suite, f"stage_{name}")(suite.dir / f"{name}.log")
                result = Stage(full, True, time.monotonic() - started, detail)
            except (StageFailed, subprocess.SubprocessError, OSError) as err:
                result = Stage(full, False, time.monotonic() - started, str(err))
        print(f"{'PASS' if result.ok else 'FAIL'}  {full:<30} {result.seconds:6.1f}s  {result.detail}", flush=True)
        results.append(result)
    return results


def device_name(cpu: bool) -> str:
    if cpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device visible"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU mode: HP_DEVICE=cpu, the CPU test config")
    parser.add_argument("--suites", help="comma-separated ds_configs names (default: all of the mode)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per stage")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu_smoke"))
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    suites = args.suites.split(",") if args.suites else list(CPU_SUITES if args.cpu else GPU_SUITES)
    missing = [s for s in suites if not (REPO / "ds_configs" / f"{s}.json").is_file()]
    if unknown or missing:
        print(f"gpu_smoke: error: unknown stages {unknown} or ds_configs {missing}; stages are {','.join(STAGES)}",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    env = environment(args.cpu)
    print(f"gpu_smoke on {device_name(args.cpu)}: suites {','.join(suites)}; stages {','.join(stages)}; logs in {out}")
    results = [r for name in suites for r in run_suite(Suite(name, out, env, args.cpu, args.timeout), stages)]
    failed = [r.name for r in results if not r.ok]
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.json").write_text(json.dumps({
        "device": device_name(args.cpu), "passed": not failed, "stages": [asdict(r) for r in results],
    }, indent=2))
    print(f"{'PASS' if not failed else 'FAIL'}  all: {len(results) - len(failed)}/{len(results)} stages passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
