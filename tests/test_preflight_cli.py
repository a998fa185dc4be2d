"""Data errors a config can reveal are refused by ``hp-deepspeed validate`` (and so by the launch
scripts' preflight) before any rank starts: exit code 2, one line naming the file and line or the
config field to change, no traceback.

Each case is a custom task of the tiny job whose files are wrong in one way: its folder is
missing, a split is missing, a row lacks a field of the input template, a label is outside
``label_words``, a CSV holds bytes that are not UTF-8, an evaluation split is empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "training" / "tiny_job.yaml")


def custom(folder: str, template: str = "classify: {text}", **extra: str) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in extra.items())
    return (f"data.custom_tasks=[{{name: my/sentiment, path: '{{ws}}/{folder}', input_template: '{template}', "
            f"label_words: [negative, positive]{', ' + fields if fields else ''}}}]")


CASES = {
    "task folder missing": (custom("absent"), "fix the path of custom task my/sentiment (data.custom_tasks[].path)"),
    "task folder named": (custom("absent"), "folder {ws}/absent does not exist"),
    "split missing": (custom("no_validation"), "task my/sentiment: no file for split 'validation'"),
    "template field absent": (custom("good", template="classify: {review}"),
                              "{ws}/good/train.jsonl:1: task my/sentiment: missing field 'review' used by input_template"),
    "label outside label_words": (custom("bad_label"),
                                  "{ws}/bad_label/train.jsonl:2: task my/sentiment: label 'maybe' is outside the label set"),
    "invalid utf-8 csv": (custom("latin1"), "{ws}/latin1/train.csv:3: not UTF-8 text"),
    "invalid utf-8 jsonl": (custom("latin1_jsonl"), "{ws}/latin1_jsonl/validation.jsonl:2: not UTF-8 text"),
    "empty eval split": (custom("empty_eval"), "split 'validation' in {ws}/empty_eval/validation.jsonl has no examples"),
}


def write_workspace(ws: Path) -> None:
    def rows(folder: str, split: str, items: list[dict]) -> None:
        (ws / folder).mkdir(exist_ok=True)
        (ws / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))

    good = [{"text": "great", "label": "positive"}, {"text": "awful", "label": 0}]
    for split in ("train", "validation"):
        rows("good", split, good)
        rows("bad_label", split, [good[0], {"text": "hmm", "label": "maybe"}])
        rows("empty_eval", split, good if split == "train" else [])
    rows("no_validation", "train", good)
    (ws / "latin1").mkdir()
    (ws / "latin1" / "train.csv").write_bytes("text,label\ngreat,positive\ncaf\u00e9,negative\n".encode("latin-1"))
    (ws / "latin1" / "validation.csv").write_text("text,label\ngreat,positive\n")
    rows("latin1_jsonl", "train", good)
    (ws / "latin1_jsonl" / "validation.jsonl").write_bytes(
        (json.dumps(good[0]) + "\n" + '{"text": "caf\u00e9", "label": 1}\n').encode("latin-1"))


def environment(ws: Path, cache: str = "cache") -> dict[str, str]:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HP_DEEPSPEED_CACHE=str(ws / cache),
               PYTHON=sys.executable, HP_NUM_GPUS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env


def validate(ws: Path, *overrides: str, launcher: str | None = None, cache: str = "cache") -> subprocess.CompletedProcess:
    args = ["--config", TINY, f"run.dir={ws}/run", "data.tasks=[synthetic/first]",
            *(o.replace("{ws}", str(ws)) for o in overrides)]
    command = [launcher, "train", *args] if launcher else [sys.executable, "-m", "hp_deepspeed.cli", "validate", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment(ws, cache), timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ws = tmp_path_factory.mktemp("preflight")
    write_workspace(ws)
    overrides = sorted({o for o, _ in CASES.values()})
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcome = dict(zip(overrides, pool.map(lambda o: validate(ws, o), overrides)))
    return ws, outcome


@pytest.mark.parametrize("name", list(CASES))
def test_a_data_error_is_refused_by_validate_in_one_line_naming_what_to_fix(results, name):
    ws, outcome = results
    override, expected = CASES[name]
    proc = outcome[override]
    report = f"exit code {proc.returncode}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, report
    assert lines[0].startswith("hp-deepspeed validate: error: "), report
    assert expected.replace("{ws}", str(ws)) in lines[0], report


def test_a_good_custom_task_validates_and_its_splits_are_tokenised_once_for_the_ranks(results):
    ws, _ = results
    proc = validate(ws, custom("good"), cache="good_cache")
    assert proc.returncode == 0, proc.stderr
    cached = sorted(p.name.split(".")[1] for p in (ws / "good_cache" / "data" / "tokenized").glob("my__sentiment.*.npz"))
    assert cached == ["train", "validation"], cached


def test_the_launch_script_refuses_a_missing_task_folder_before_any_rank_starts(results):
    ws, _ = results
    proc = validate(ws, custom("absent"), launcher=str(REPO / "launch" / "local.sh"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "fix the path of custom task my/sentiment" in output, output
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output  # nothing else started


def test_an_error_every_rank_meets_is_printed_once_per_node(monkeypatch, capsys, tmp_path):
    from hp_deepspeed import cli

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    line = f"hp-deepspeed train: error: {tmp_path}/x.jsonl:3: not UTF-8 text"
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli.print_once(line)  # rank 0
    cli.print_once(line)  # rank 1, same launcher (parent process), same line
    cli.print_once(line.replace(":3:", ":4:"))  # another problem is printed
    assert capsys.readouterr().err.splitlines() == [line, line.replace(":3:", ":4:")]
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process always prints
    cli.print_once(line)
    assert capsys.readouterr().err.splitlines() == [line]
