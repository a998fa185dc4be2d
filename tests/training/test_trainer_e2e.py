"""The trainer end to end through the real `deepspeed` launcher: exact resume after SIGKILL,
resume on a different number of ranks, preemption, export and predict.

Each run is a real multi-process ZeRO-3 job on the CPU (gloo), fp32, so equality is exact where
the computation is the same and within fp32 tolerance where the reduction order differs.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hp_deepspeed.testing.ranks import base_env, free_port, run_command
from hp_deepspeed.training.metrics_log import read_metrics

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "training" / "tiny_job.yaml"
# "Learns": the mean loss of steps 7-8 is below LEARNS x that of steps 1-2. Measured on 2 CPU
# ranks: 23.7 -> 9.2 (a ratio of 0.39); a run that does not learn stays near 1.
LEARNS = 0.6


def train_cmd(run_dir: Path, *overrides: str, ranks: int = 2) -> list[str]:
    train = ["train", "--config", str(JOB), f"run.dir={run_dir}", *overrides]
    if ranks == 1:  # a plain process: world size 1 without any launcher
        return [sys.executable, "-m", "hp_deepspeed.cli", *train]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", "hp_deepspeed.cli", *train]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of 8 steps (checkpoints every 2); what it printed is beside
    it, in ``<run dir>.log``."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run_command(train_cmd(run_dir), timeout=420, cwd=REPO)
    run_dir.with_suffix(".log").write_text(result.output)
    return run_dir


@pytest.fixture(scope="module")
def reference_run_without_dropout(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference-no-dropout")
    run_command(train_cmd(run_dir, "model.dropout_rate=0.0", "checkpoint.keep_last=4"), timeout=420, cwd=REPO)
    return run_dir


def test_reference_run_learns_and_leaves_checkpoints(reference_run):
    steps = losses(reference_run)
    assert sorted(steps) == list(range(1, 9))
    # Learning, not noise: the mean of the last two steps' losses is well below the first two.
    assert (steps[7] + steps[8]) / 2 < LEARNS * (steps[1] + steps[2]) / 2, steps
    checkpoints = reference_run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-8"
    assert (checkpoints / "step-8" / "COMPLETE").is_file()
    evals = [r for r in read_metrics(reference_run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and "glue/rte/accuracy" in evals[-1] and "synthetic/first/accuracy" in evals[-1]


def test_the_start_line_comes_once_from_rank_0_and_says_what_runs(reference_run):
    output = reference_run.with_suffix(".log").read_text()
    lines = [line for line in output.splitlines() if "training on " in line]
    assert len(lines) == 1, lines  # rank 0 only, not once per rank
    expected = (r"INFO hp_deepspeed\.training\.trainer: training on 2 rank\(s\), CPU, [1-9]\d* threads per rank; "
                r"ZeRO stage 3 \(ds_configs/zero3_cpu_test\.json\); fp32; checkpoints in ")
    assert re.search(expected + re.escape(str(reference_run / "checkpoints")) + "$", lines[0]), lines
    assert "training examples in 2 task(s), one row per example, ready in" in output  # 2 ranks: no packing


def test_sigkill_at_a_random_step_then_resume_gives_identical_losses(reference_run, tmp_path):
    # A step between checkpoints (interval 2), so the resume must replay a step the killed run had
    # already taken. The seed is fresh each run (set PYTEST_SEED to replay one) and in the message.
    seed = int(os.environ.get("PYTEST_SEED") or random.SystemRandom().randrange(10**6))
    kill_after = random.Random(seed).choice([3, 5])
    where = f"killed after step {kill_after} (PYTEST_SEED={seed})"
    proc = subprocess.Popen(train_cmd(tmp_path), cwd=REPO, env=base_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = tmp_path / "metrics.jsonl"
            if metrics.is_file() and max(losses(tmp_path), default=0) >= kill_after:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(losses(tmp_path)) >= kill_after, f"the run died before the kill; {where}"
    assert max(losses(tmp_path)) < 8, f"the run finished before the kill; {where}"

    run_command(train_cmd(tmp_path, ranks=2) + ["--resume", "auto"], timeout=420, cwd=REPO)
    assert losses(tmp_path) == losses(reference_run), where  # bit-identical, every step


def test_two_rank_checkpoint_resumes_on_one_rank(reference_run_without_dropout, tmp_path):
    reference_run = reference_run_without_dropout
    step4 = reference_run / "checkpoints" / "step-4"
    start = 4
    # One rank with twice the micro-batch: the same global batch, hence the same data stream and
    # (with the world-size-invariant loss) the same objective. Dropout is off for this comparison:
    # its masks come from per-rank generators, so they legitimately differ between 2 ranks and 1.
    # The one rank packs its micro-batch (data.packing: auto) and the two ranks do not: packing
    # changes the layout of a batch, not its examples, so the losses still agree.
    result = run_command(train_cmd(tmp_path, "training.micro_batch_size=8", "model.dropout_rate=0.0", ranks=1)
                         + ["--resume", str(step4)], timeout=420, cwd=REPO)
    assert re.search(r"data: \d+ training examples in \d+ task\(s\), packed rows, ready in", result.output)
    resumed, reference = losses(tmp_path), losses(reference_run)
    assert sorted(resumed) == list(range(start + 1, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=2e-5), step
    assert (step4 / "universal").is_dir()  # converted automatically for the new world size


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "export"
    run_command([sys.executable, "-m", "hp_deepspeed.cli", "export", "--run-dir", str(reference_run),
                 "--out", str(out)], timeout=300, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def live_model(reference_run):
    """The trained model of step 8 with its live conditioning (the hypernetworks run)."""
    from hp_deepspeed.export.consolidate import load_run_model

    return load_run_model(reference_run / "checkpoints" / "step-8")


def test_export_equals_the_live_model_and_its_prompts_matter(exported, live_model):
    import torch
    from transformers import T5ForConditionalGeneration

    from hp_deepspeed.export import load_export

    manifest = json.loads((exported / "export.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["synthetic/first", "glue/rte"]
    assert manifest["step"] == 8
    ours, _, _ = load_export(exported, torch.device("cpu"))
    _, _, live = live_model
    ids = torch.tensor([[5, 9, 13, 21, 1], [7, 7, 30, 1, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[7, 1], [11, 1]])
    with torch.no_grad():
        logits = {t: ours(ids, mask, labels=labels, task_ids=torch.full((2,), t)).logits for t in (0, 1)}
        for t in (0, 1):  # precomputed prompts == the hypernetworks' live output, per task
            live_logits = live(ids, mask, labels=labels, task_ids=torch.full((2,), t)).logits
            torch.testing.assert_close(logits[t], live_logits, rtol=1e-5, atol=1e-5)
        # The conditioning is not a no-op: the two tasks, and the bare backbone, disagree.
        assert (logits[0] - logits[1]).abs().max() > 1e-3
        bare = ours.backbone(ids, mask, labels=labels).logits
        assert (bare - logits[0]).abs().max() > 1e-3
        # The backbone is a Hugging Face checkpoint: transformers loads it and agrees with ours.
        theirs = T5ForConditionalGeneration.from_pretrained(exported / "backbone").eval()
        torch.testing.assert_close(bare, theirs(input_ids=ids, attention_mask=mask, labels=labels).logits,
                                   rtol=1e-5, atol=1e-5)


def test_predict_without_deepspeed_answers_as_the_live_model(exported, live_model):
    import torch

    from hp_deepspeed.data import load_tokenizer
    from hp_deepspeed.export.predict import model_inputs, read_rows
    from hp_deepspeed.training.evaluation import rank_classify, tokenize_label_words

    rows_file = REPO / "hp_deepspeed" / "bundled" / "data" / "glue" / "rte" / "validation.jsonl"
    result = run_command([sys.executable, "-m", "hp_deepspeed.cli", "predict", "--export", str(exported),
                          "--task", "glue/rte", "--input", str(rows_file)], timeout=300, cwd=REPO)
    predictions = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    assert [p["row"] for p in predictions] == list(range(len(rows)))
    # The same rows answered by the live model of the checkpoint, one at a time (no padding).
    cfg, tasks, live = live_model
    task = next(t for t in tasks if t.name == "glue/rte")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    label_ids = tokenize_label_words(tokenizer, task.label_words)
    expected = []
    for text in model_inputs(task, read_rows(str(rows_file))):
        enc = tokenizer([text], truncation=True, max_length=cfg.data.max_input_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "task_ids": torch.tensor([task.task_id])}
        expected.append(task.label_words[int(rank_classify(live, batch, label_ids)[0])])
    assert [p["text"] for p in predictions] == expected


def test_export_of_the_best_checkpoint_of_a_task(reference_run, tmp_path):
    from hp_deepspeed.checkpointing import CheckpointError
    from hp_deepspeed.export import export_run

    best = json.loads((reference_run / "checkpoints" / "best.json").read_text())
    assert set(best) == {"synthetic/first", "glue/rte"}
    out = export_run(reference_run, tmp_path / "best", checkpoint="best:glue/rte")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["step"] == best["glue/rte"]["step"]
    assert manifest["source"] == str((reference_run / "checkpoints" / f"step-{manifest['step']}").resolve())
    with pytest.raises(CheckpointError, match="no best checkpoint recorded for task 'glue/cola'"):
        export_run(reference_run, tmp_path / "none", checkpoint="best:glue/cola")


def printed_scores(output: str) -> dict[str, str]:
    """``{"<set>/<metric>": "12.34"}`` from the table ``Evaluator.format_table`` prints."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("evaluation at step"))
    scores = {}
    for line in lines[start + 2:]:
        name, *items = line.split()
        pairs = [item.partition("=") for item in items]
        if len(pairs) == 1 and not pairs[0][1]:  # "glue_average  61.00"
            scores[name] = items[0]
        elif pairs and all(sep for _, sep, _ in pairs):  # "glue/rte  accuracy=50.00  score=50.00"
            scores.update((f"{name}/{metric}", value) for metric, _, value in pairs)
        else:
            break  # the end of the table
    return scores


def test_eval_command_prints_the_runs_recorded_scores_on_2_and_1_ranks(reference_run):
    """`eval` of the newest checkpoint prints what the training run itself recorded at step 8,
    on the same 2 ranks and on 1 rank (through the universal checkpoint)."""
    recorded = next(r for r in read_metrics(reference_run / "metrics.jsonl") if r["kind"] == "eval")
    assert recorded["step"] == 8
    expected = {k: f"{v:.2f}" for k, v in recorded.items() if k not in ("kind", "step", "time")}
    assert "glue/rte/accuracy" in expected and "synthetic/first/accuracy" in expected
    for ranks in (2, 1):
        # max_examples_per_task scores the first global batch: keep it the same 32 examples.
        cmd = train_cmd(reference_run, f"eval.batch_size={32 // ranks}", ranks=ranks)
        cmd[cmd.index("train")] = "eval"
        result = run_command(cmd + ["--checkpoint", "auto"], timeout=420, cwd=REPO)
        assert "evaluation at step 8" in result.output
        assert printed_scores(result.output) == expected, f"{ranks} rank(s)"
