"""Every class of bad input through the real command line: exit code 2, exactly one error line
naming the file/key/row and what was expected, no traceback, and no byte changed in any run or
export folder.

The classes: config values (a range check of every section), YAML syntax, launch arguments,
checkpoints to resume or evaluate, exports, data rows (predict's rows in every file format).
Training and evaluation rows go through the same reader (``data.sources.read_file``); their
one-message behaviour is tested in process in tests/data/test_bad_input.py, because a ``train``
subprocess only reaches its data after starting DeepSpeed.

All cases run once per module (``results``, two processes at a time, most of them forked from
one process that has the imports done: see ``FORKER``), and each case is then one parametrized test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "training" / "tiny_job.yaml")
EXPORT_FORMAT = "hp_deepspeed.export/1"


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    """Arguments of ``python -m hp_deepspeed.cli`` ({ws} is the workspace), or a launch script's
    command line when it starts with ``launch/``."""
    expected: str
    """A fragment of the single error line (names the file/key/row and what was expected)."""
    stdin: str = ""


def cli(*argv: str, expected: str, stdin: str = "") -> Case:
    return Case(tuple(argv), expected, stdin)


def job(*overrides: str, expected: str, command: str = "validate") -> Case:
    return Case((command, "--config", TINY, "run.dir={ws}/run", *overrides), expected)


def predict(rows: str, expected: str, *extra: str, task: str = "glue/rte") -> Case:
    return Case(("predict", "--export", "{ws}/export", "--task", task, "--input", "{ws}/" + rows, *extra), expected)


CASES: dict[str, Case] = {
    # --- config values: one range check per section, types, keys
    "training.steps": job("training.steps=-5", expected="training.steps must be >= 1, got -5"),
    "training.micro_batch_size": job("training.micro_batch_size=0", expected="training.micro_batch_size must be >= 1, got 0"),
    "run.dir": job("run.dir=''", expected="run.dir must be a folder path"),
    "optim.lr": job("optim.lr=0", expected="optim.lr must be positive, got 0.0"),
    "eval.batch_size": job("eval.batch_size=0", expected="eval.batch_size must be >= 1, got 0"),
    "checkpoint.keep_last": job("checkpoint.keep_last=0", expected="checkpoint.keep_last must be >= 1, got 0"),
    "preemption.signals": job("preemption.signals=[SIGFOO]", expected="preemption.signals: 'SIGFOO' is not a signal name"),
    "conditioning.prompt_length": job("conditioning.prompt_length=0", expected="conditioning.prompt_length must be >= 1, got 0"),
    "data.temperature": job("data.temperature=0", expected="data.temperature must be > 0, got 0.0"),
    "data.max_input_length": job("data.max_input_length=0", expected="data.max_input_length must be >= 1, got 0"),
    "unknown key": job("optim.lrr=1", expected="unknown config key optim.lrr; OptimConfig accepts:"),
    "wrong type": job("training.steps=many", expected="training.steps: expected an integer, got 'many'"),
    "unknown task": job("data.tasks=[glue/nope]", expected="unknown task 'glue/nope'"),
    "custom task": job("data.custom_tasks=[{name: my/t, input_template: 'x: {text}', label_words: [a, b]}]",
                       expected="custom task my/t: set path (folder or hub id) or data_files"),
    "ds_config file": job("training.ds_config={ws}/absent.json", expected="training.ds_config: file {ws}/absent.json does not exist"),
    "model folder": job("model.name_or_path={ws}/absent", expected="{ws}/absent: no config.json found"),
    "model weights": job("model.name_or_path={ws}/no_weights", "model.load_weights=true",
                         expected="{ws}/no_weights: no weights found"),
    "model config.json": job("model.name_or_path={ws}/broken_model", expected="{ws}/broken_model/config.json: not valid JSON"),
    # --- YAML syntax: file, line, column, what was expected
    "yaml syntax": cli("validate", "--config", "{ws}/unclosed.yaml",
                       expected="config file {ws}/unclosed.yaml:2:2: invalid YAML: expected ',' or ']', but got ':'"),
    "yaml tab": cli("validate", "--config", "{ws}/tab.yaml",
                    expected="config file {ws}/tab.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token"),
    "yaml not a mapping": cli("validate", "--config", "{ws}/list.yaml", expected="{ws}/list.yaml: expected a mapping at the top level"),
    "yaml override": job("training.steps=[", expected="override 'training.steps=[': invalid YAML"),
    "config file missing": cli("validate", "--config", "{ws}/absent.yaml", expected="config file {ws}/absent.yaml does not exist"),
    # --- launch arguments
    "unknown option": job("--bogus", expected="unrecognized arguments: --bogus"),
    "override without =": job("training.steps", expected="override 'training.steps': expected KEY=VALUE"),
    "override after --checkpoint": job("--checkpoint", "auto", "training.steps=-1", expected="training.steps must be >= 1, got -1"),
    "no subcommand": cli(expected="the following arguments are required: command"),
    "missing option": cli("predict", "--export", "{ws}/export", expected="the following arguments are required: --task"),
    "bad integer option": predict("rows.jsonl", "argument --batch-size: expected an integer >= 1, got 0", "--batch-size", "0"),
    "stray override": cli("export", "--run-dir", "{ws}/run", "--out", "{ws}/out", "a=b", expected="unrecognized arguments: a=b"),
    # --- checkpoints: checked from the markers before DeepSpeed, a model or metrics.jsonl exist
    "eval without checkpoint": job("--checkpoint", "auto", command="eval",
                                   expected="{ws}/run/checkpoints: no complete checkpoint to evaluate"),
    "validate eval without checkpoint": job("--checkpoint", "auto", expected="{ws}/run/checkpoints: no complete checkpoint"),
    "eval --checkpoint none": job("--checkpoint", "none", command="eval", expected="--checkpoint none: evaluation needs a checkpoint"),
    "dead latest pointer": Case(("train", "--config", TINY, "run.dir={ws}/dead", "--resume", "auto"),
                                "{ws}/dead/checkpoints/latest names 'step-40', which no longer exists"),
    "resume path missing": job("--resume", "{ws}/run/checkpoints/step-9", command="train",
                               expected="resume path {ws}/run/checkpoints/step-9 does not exist"),
    "resume unfinished save": job("--resume", "{ws}/run/checkpoints/step-7",
                                  expected="{ws}/run/checkpoints/step-7: no COMPLETE marker"),
    "resume not step-N": job("--resume", "{ws}/run", expected="resume path {ws}/run is not a step-N checkpoint folder"),
    "export without checkpoint": cli("export", "--run-dir", "{ws}/empty", "--out", "{ws}/out",
                                     expected="{ws}/empty/checkpoints: no complete checkpoint to export"),
    "export best without best.json": cli("export", "--run-dir", "{ws}/run", "--out", "{ws}/out", "--checkpoint", "best:glue/rte",
                                         expected="no best checkpoint recorded for task 'glue/rte'"),
    "export unfinished save": cli("export", "--run-dir", "{ws}/run", "--out", "{ws}/out", "--checkpoint", "step-7",
                                  expected="step-7: not a complete checkpoint (no COMPLETE marker)"),
    # --- exports
    "export folder": cli("predict", "--export", "{ws}/absent", "--task", "glue/rte", expected="{ws}/absent: no export.json"),
    "export.json syntax": cli("predict", "--export", "{ws}/broken_export", "--task", "glue/rte",
                              expected="{ws}/broken_export/export.json: not valid JSON"),
    "export task": predict("rows.jsonl", "--task glue/cola: not a task of this export; it has: synthetic/first, glue/rte",
                           task="glue/cola"),
    # --- predict rows: one row number, whatever the format
    "jsonl row": predict("bad.jsonl", "{ws}/bad.jsonl:2: malformed JSON row: Expecting value at column 1"),
    "jsonl field": predict("missing_field.jsonl", "{ws}/missing_field.jsonl:2: task glue/rte: missing field 'sentence2'"),
    "jsonl encoding": predict("latin1.jsonl", "{ws}/latin1.jsonl:1: not UTF-8 text"),
    "csv row": predict("bad.csv", "{ws}/bad.csv:3: malformed CSV row: 3 fields, header has 2"),
    "json syntax": predict("bad.json", "{ws}/bad.json:2:1: malformed JSON"),
    "parquet file": predict("bad.parquet", "--input {ws}/bad.parquet cannot be read as parquet"),
    "input extension": predict("rows.txt", "--input {ws}/rows.txt has an unsupported extension"),
    "input missing": predict("absent.jsonl", "--input {ws}/absent.jsonl does not exist"),
    "no rows": predict("empty.jsonl", "no rows to predict"),
    "stdin row": cli("predict", "--export", "{ws}/export", "--task", "glue/rte",
                     expected="stdin:2: malformed JSON row", stdin='{"sentence1": "a", "sentence2": "b"}\n{oops\n'),
    "device": predict("rows.jsonl", "--device gpu0: expected auto, cpu, cuda or cuda:N", "--device", "gpu0"),
    # --- the launch scripts' preflight prints the same line
    "launch eval without checkpoint": Case(("launch/local.sh", "eval", "--config", TINY, "run.dir={ws}/run", "--checkpoint", "auto"),
                                           "{ws}/run/checkpoints: no complete checkpoint"),
    "launch eval default checkpoint": Case(("launch/local.sh", "eval", "--config", TINY, "run.dir={ws}/empty"),
                                           "{ws}/empty/checkpoints: no complete checkpoint"),
    "launch late override": Case(("launch/local.sh", "train", "--config", TINY, "run.dir={ws}/run", "--resume", "auto",
                                  "training.micro_batch_size=0"), "training.micro_batch_size must be >= 1, got 0"),
}

WATCHED = ("run", "dead", "empty", "export", "broken_export")
"""Folders no failing command may change."""


def write_workspace(ws: Path) -> None:
    run = ws / "run"
    (run / "checkpoints" / "step-7").mkdir(parents=True)  # a save that never finished: no COMPLETE
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    (ws / "dead" / "checkpoints").mkdir(parents=True)
    (ws / "dead" / "checkpoints" / "latest").write_text("step-40\n")
    (ws / "dead" / "checkpoints" / "best.json").write_text('{"glue/rte": {"step": 40, "score": 71.0}}\n')
    (ws / "dead" / "metrics.jsonl").write_text('{"kind": "eval", "step": 40}\n')
    (ws / "empty").mkdir()
    (ws / "no_weights").mkdir()
    (ws / "no_weights" / "config.json").write_text((REPO / "configs" / "models" / "t5-demo" / "config.json").read_text())
    (ws / "broken_model").mkdir()
    (ws / "broken_model" / "config.json").write_text('{"model_type": "t5",')
    (ws / "unclosed.yaml").write_text("a: [1\nb: 2\n")
    (ws / "tab.yaml").write_text("training:\n\tsteps: 3\n")
    (ws / "list.yaml").write_text("- training\n")
    export = ws / "export"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"format": EXPORT_FORMAT, "tasks": []}))
    validate = subprocess.run([sys.executable, "-m", "hp_deepspeed.cli", "validate", "--config", TINY],
                              capture_output=True, text=True, cwd=REPO, env=environment(ws), check=True)
    (export / "config.yaml").write_text(validate.stdout)
    (ws / "broken_export").mkdir()
    (ws / "broken_export" / "export.json").write_text("{")
    good = json.dumps({"sentence1": "a", "sentence2": "b", "label": 0})
    (ws / "rows.jsonl").write_text(good + "\n")
    (ws / "bad.jsonl").write_text(good + "\nnot json\n")
    (ws / "missing_field.jsonl").write_text(good + "\n" + json.dumps({"sentence1": "a"}) + "\n")
    (ws / "latin1.jsonl").write_bytes('{"sentence1": "caf\u00e9"}\n'.encode("latin-1"))
    (ws / "bad.csv").write_text("sentence1,sentence2\na,b\nc,d,e\n")
    (ws / "bad.json").write_text('[{"sentence1": "a"},\n]\n')
    (ws / "bad.parquet").write_bytes(b"PAR1 not really")
    (ws / "rows.txt").write_text(good + "\n")
    (ws / "empty.jsonl").write_text("")


def environment(ws: Path) -> dict[str, str]:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HP_DEEPSPEED_CACHE=str(ws / "cache"),
               PYTHON=sys.executable, HP_NUM_GPUS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file's sha256 and every folder's presence, by relative path."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        digest[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


# One process imports the CLI and the libraries every case imports anyway, then forks one child
# per case that runs ``cli.main`` with the case's argv and its own stdin/stdout/stderr files and
# exits with its code: each case is still its own process through the real entry point, but costs
# its own work only, not 3-4 s of imports. Cases marked ``fresh`` (and the launch scripts) run as
# new processes, so output printed while importing would be caught too.
FORKER = r"""
import json, os, sys, traceback
from hp_deepspeed import cli
import hp_deepspeed.training.train_config, hp_deepspeed.export, hp_deepspeed.data.sources, transformers, datasets  # noqa
cases, out = json.load(open(sys.argv[1])), sys.argv[2]
running, codes = {}, {}
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for key, (argv, stdin) in cases.items():
    if len(running) == 2:
        reap()
    base = os.path.join(out, key)
    with open(base + ".in", "w") as fh:
        fh.write(stdin)
    pid = os.fork()
    if pid == 0:
        for fd, suffix, flags in ((0, ".in", os.O_RDONLY), (1, ".out", os.O_WRONLY | os.O_CREAT), (2, ".err", os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(base + suffix, flags), fd)
        code = 1
        try:
            code = cli.main(argv)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else int(err.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    running[pid] = key
while running:
    reap()
json.dump(codes, open(os.path.join(out, "codes.json"), "w"))
"""


def run_case(ws: Path, case: Case) -> subprocess.CompletedProcess:
    argv = [arg.replace("{ws}", str(ws)) for arg in case.argv]
    command = argv if argv and argv[0].startswith("launch/") else [sys.executable, "-m", "hp_deepspeed.cli", *argv]
    return subprocess.run(command, input=case.stdin, capture_output=True, text=True, cwd=REPO,
                          env=environment(ws), timeout=300)


def run_forked(ws: Path, cases: dict[str, Case]) -> dict[str, subprocess.CompletedProcess]:
    out = ws / "forked"
    out.mkdir()
    keys = {name: f"case{i}" for i, name in enumerate(cases)}
    spec = {keys[name]: ([a.replace("{ws}", str(ws)) for a in case.argv], case.stdin) for name, case in cases.items()}
    (out / "cases.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-c", FORKER, str(out / "cases.json"), str(out)], cwd=REPO, env=environment(ws),
                   check=True, timeout=600)
    codes = json.loads((out / "codes.json").read_text())
    return {name: subprocess.CompletedProcess(cases[name].argv, codes[key], (out / f"{key}.out").read_text(),
                                              (out / f"{key}.err").read_text())
            for name, key in keys.items()}


FRESH = ("yaml syntax", "jsonl row", "dead latest pointer", "no subcommand")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bad_input")
    write_workspace(ws)
    before = {name: folder_digest(ws / name) for name in WATCHED}
    fresh = [name for name, case in CASES.items() if name in FRESH or case.argv[:1] and case.argv[0].startswith("launch/")]
    outcome = run_forked(ws, {name: case for name, case in CASES.items() if name not in fresh})
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcome.update(zip(fresh, pool.map(lambda name: run_case(ws, CASES[name]), fresh)))
    after = {name: folder_digest(ws / name) for name in WATCHED}
    return ws, outcome, before, after


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_and_changes_nothing(results, name):
    ws, outcome, before, after = results
    proc = outcome[name]
    report = f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, report
    assert len(lines) == 1, report
    assert lines[0].startswith("hp-deepspeed"), report
    assert CASES[name].expected.replace("{ws}", str(ws)) in lines[0], report
    assert after == before  # no run or export folder was touched, by this case or any other


def test_overrides_may_follow_resume_and_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hp_deepspeed.cli", "validate", "--config", TINY,
                           f"run.dir={tmp_path}", "--resume", "auto", "training.steps=3", "optim.lr=0.5"],
                          capture_output=True, text=True, cwd=REPO, env=environment(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "  steps: 3\n" in proc.stdout and "  lr: 0.5\n" in proc.stdout
    assert not any(tmp_path.iterdir()) or set(p.name for p in tmp_path.iterdir()) <= {"cache"}


def test_the_rule_is_one_line_for_every_input_error(monkeypatch, capsys):
    """``cli.main`` is the one place that turns an input error into its line: a multi-part message
    (a checkpoint that does not match, listing each difference) is joined, not spread over lines."""
    from hp_deepspeed import cli
    from hp_deepspeed.checkpointing import CheckpointError

    def mismatch(args):
        raise CheckpointError("checkpoint runs/x/checkpoints/step-4 does not match this job:\n  - ZeRO stage: 2 vs 3\n  - precision")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), mismatch))
    assert cli.main(["validate"]) == 2
    err = capsys.readouterr().err
    assert err == ("hp-deepspeed validate: error: checkpoint runs/x/checkpoints/step-4 does not match this job: "
                   "ZeRO stage: 2 vs 3; precision\n")


def _with_func(parser, func):
    parser._subparsers._group_actions[0].choices["validate"].set_defaults(func=func)
    return parser
