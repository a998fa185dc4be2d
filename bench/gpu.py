"""One command for the GPU speed table, and its CPU proxy: the driver.

    python -m bench.gpu [--out DIR] [--tiny | --full] [--stages NAME ...] [--budget-s 480]

Runs every stage below in its own subprocess (``python -m bench.gpu --stage NAME``) under its own
timeout, most important first, and writes one JSON file per stage plus ``summary.json`` to
``--out`` (default ``$OUT``, else bench/results/gpu). A stage that fails or times out writes its
error and the output tail instead, and the next stage still runs. Inside a stage the engines take
turns, one training step each (A B C A B C ..., the order rotated every round), after untimed
warm-up steps (ZeRO-3's second step is slow on a GPU: it allocates its buffers), so every ratio
compares steps measured side by side in one process.

On a GPU (``--full``, the default there) the shapes are those of the speed targets: bf16, 512 input / 128 target
tokens, t5-large batch 16, t5-v1_1-xl batch 16 (full fine-tune), t5-v1_1-xxl batch 8 (frozen
backbone), activation checkpointing for the last two. On the CPU (``--tiny``, the default there)
the same stages run with the tiny presets and a few tokens, fp32 (the ``host`` stage in bf16, as
on a GPU), so the script cannot rot; the
``proxy`` stage is the host-overhead proxy (t5-small shape, batch 4, 64 -> 16
tokens, fp32: ZeRO-3 at world size 1 over plain PyTorch, and transformers' T5 on the same engine),
and the ``host`` stage the same engines at t5-large's depth with a negligible width (d_model 64):
there a step is almost only host time -- Python, the dispatcher, ZeRO-3's module hooks -- which
is what bounds a GPU step when kernels are launched faster than they finish. It keeps the GPU's
precision on the CPU too (``gpu_precision``), so its engines run the GPU's code paths: plain
PyTorch with bf16 autocast and fused AdamW, DeepSpeed's BF16_Optimizer for stage 0 (which the
project's fp32 gradient accumulation makes stage 1), its bf16 ZeRO-2 and ZeRO-3.
Every step's wall time and process CPU time are recorded; on a CPU shared with other jobs the CPU
time is the steadier measure of the host work (run the proxy with ``OMP_NUM_THREADS=1`` so that
idle OpenMP threads spinning do not count).

Engines ("runners"):

* ``plain``: our model, ``torch.optim.AdamW`` (fused), fp32 weights, bf16 autocast (on the CPU
  fp32 and unfused, except in the ``host`` stage) -- the reference every DeepSpeed figure is
  compared with;
* ``default``: the project's default ``training.ds_config`` through ``build_ds_config``, i.e. the
  configuration a user gets (ZeRO stage and sizes chosen by ``training/parallelism.py``);
* ``zero0`` / ``zero2`` / ``zero3``: that stage forced (``ds_configs/zero3_bf16.json`` with the
  stage replaced; its "auto" sizes resolved by the project; under ZeRO-3 our T5 blocks are leaf
  modules, ``training.zero3_leaf_blocks``, as in the trainer);
* ``zero3_per_module``: ``zero3`` without leaf blocks (DeepSpeed's hooks on every submodule);
* ``zero3_hf_rule``: ZeRO-3 with the sizes of the Hugging Face rule (buckets d_model^2,
  persistence 10 d_model), beside the project's own choice;
* ``hf``: transformers' ``T5ForConditionalGeneration`` under the ``zero3`` config.

DeepSpeed engines use torch's AdamW (``torch_adam``) so that no FusedAdam JIT build is timed.
MFU is model FLOPs (``training/flops.py``) per second over the card's bf16 peak
(``flops.device_peak_tflops``); on the CPU only achieved GFLOP/s are given.

This module owns the driver: one subprocess per stage under its own timeout, the summary table
and the targets. The stages and runners are ``gpu_stages.py``; what runs inside a stage's
subprocess is ``gpu_runners.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.gpu_runners import run_stage
from bench.gpu_stages import Stage, stages_for
from hp_deepspeed.launching.distributed import shutdown_distributed
from hp_deepspeed.testing.ranks import DistributedTestError, run_command

REPO = Path(__file__).resolve().parents[1]


def run_in_subprocess(stage: Stage, mode: str, out: Path, timeout_s: float) -> dict:
    """Run one stage in a fresh process; its JSON, or the failure with the output's tail."""
    path = out / f"{stage.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu", "--stage", stage.name, "--mode", mode, "--out", str(out)]
    # Its own session, killed as a group on timeout: a JIT build (ninja) must not outlive it.
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    start = time.perf_counter()
    try:
        done = run_command(cmd, timeout=timeout_s, env=threads, cwd=REPO, check=False)
        rc, tail = done.returncode, done.output
    except DistributedTestError as err:  # the timeout
        rc, tail = "timeout", str(err)
    (out / f"{stage.name}.log").write_text(tail)
    if rc == 0 and path.is_file():
        return json.loads(path.read_text())
    result = {"stage": asdict(stage), "error": f"exit {rc} after {time.perf_counter() - start:.0f}s (limit {timeout_s:.0f}s)",
              "output_tail": tail[-4000:]}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# The GPU speed targets, each read from runners measured side by side in one stage:
# (target, stage, how to measure, goal). A ratio is step time over step time.
TARGETS = (
    ("t5-large b16 MFU, default config, HyperPrompt-Global", "large_default", ("mfu", "default_hp_global"), (">=", 0.40)),
    ("t5-v1_1-xl b16 MFU, full fine-tune", "xl_full", ("mfu", "default_hp_global"), (">=", 0.40)),
    ("t5-v1_1-xxl b8 MFU, frozen backbone", "xxl_frozen", ("mfu", "default_hp_global"), (">=", 0.35)),
    ("ZeRO-3 forced / best of ZeRO-0 and ZeRO-2, step time", "large_stages", ("ratio", "zero3_none", ("zero0_none", "zero2_none")), ("<=", 1.25)),
    ("transformers' T5 / ours under the same ZeRO-3, step time", "large_zero3", ("ratio", "zero3_hf", ("zero3_none",)), (">=", 2.0)),
    ("HyperPrompt-Global / no conditioning, default config, step time", "large_default", ("ratio", "default_hp_global", ("default_none",)), ("<=", 1.03)),
)


def target_rows(results: list[dict]) -> list[dict]:
    """Each target with its measured value, or why it has none (stage not run, failed, no peak)."""
    by_stage = {res["stage"]["name"]: res for res in results}
    rows = []
    for name, stage, (kind, runner, *rest), (op, goal) in TARGETS:
        res, value, why = by_stage.get(stage), None, None
        runners = (res or {}).get("runners", {})
        if res is None or "error" in res:
            why = "stage not run" if res is None else res["error"]
        elif kind == "mfu":
            value = runners[runner]["mfu"]
            why = "no known peak for this device" if value is None else None
        else:
            value = runners[runner]["step_s_median"] / min(runners[r]["step_s_median"] for r in rest[0])
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        rows.append({"target": name, "stage": stage, "value": value, "goal": f"{op} {goal:g}", "met": met, "why": why})
    return rows


def summary_rows(results: list[dict]) -> list[list]:
    rows = []
    for res in results:
        if "error" in res:
            rows.append([res["stage"]["name"], "-", res["error"], "", "", "", "", "", ""])
        for name, r in res.get("runners", {}).items():
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            stage_cfg = (r["zero_optimization"] or {}).get("stage", "plain")
            rows.append([res["stage"]["name"], name, f"ZeRO-{stage_cfg}" if stage_cfg != "plain" else "plain",
                         r["step_s_median"], r["tokens_per_s"], mfu, r["ratio_to_first"], r["cpu_s_median"],
                         r["cpu_ratio_to_first"]])
    return rows


def drive(mode: str, out: Path, names: list[str] | None, budget_s: float) -> list[dict]:
    from bench.common import machine, table

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    results = []
    for stage in stages_for(mode):
        if names and stage.name not in names:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            results.append({"stage": asdict(stage), "error": "skipped: the time budget is spent"})
            continue
        print(f"== {stage.name} ({stage.preset}, batch {stage.batch}, {stage.enc_len}->{stage.dec_len})", flush=True)
        results.append(run_in_subprocess(stage, mode, out, min(stage.timeout_s, left)))
    print(table(["stage", "runner", "engine", "step s", "tokens/s", "MFU", "x first", "CPU s", "CPU x first"],
                summary_rows(results)))
    targets = target_rows(results)
    print(table(["target", "measured", "goal", "verdict"], [
        [t["target"], "-" if t["value"] is None else f"{t['value']:.3g}", t["goal"],
         t["why"] if t["met"] is None else ("met" if t["met"] else "MISSED")] for t in targets]))
    summary = {"benchmark": "gpu", "mode": mode, "machine": machine(), "targets": targets, "stages": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json")
    return results


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="CPU-size shapes")
    group.add_argument("--full", dest="mode", action="store_const", const="full", help="the GPU shapes of the speed targets")
    group.add_argument("--proxy", dest="mode", action="store_const", const="proxy", help="the CPU host-overhead proxy")
    parser.add_argument("--mode", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--stages", nargs="+", help="run only these stages")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all stages")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args(argv)
    mode = args.mode or ("full" if torch.cuda.is_available() else "tiny")
    out = Path(args.out)
    if args.stage:
        stage = next(s for s in stages_for(mode) if s.name == args.stage)
        (out / f"{stage.name}.json").write_text(json.dumps(run_stage(stage), indent=2) + "\n")
        shutdown_distributed()  # a stage that trained leaves a process group
        return
    drive(mode, out, args.stages, args.budget_s)


if __name__ == "__main__":
    main()
