"""`python -m bench.fidelity` keeps working: a tiny study trains, caches per cell, resumes,
and writes the table, the ordering check and the PNG (a few steps, two variants, one seed)."""

import json

import pytest

from bench import fidelity

pytestmark = pytest.mark.slow

TINY = ["--variants", "none", "hyperformer", "--seeds", "0", "--steps", "3", "--batch-size", "4",
        "--max-eval-examples", "8", "--eval-batch-size", "8", "--max-new-tokens", "4", "--low-resource", "8", "--jobs", "1"]


def test_tiny_study_writes_the_report_and_resumes_per_cell(tmp_path, capsys):
    out, doc = tmp_path / "study", tmp_path / "docs" / "fidelity.md"
    args = TINY + ["--out-dir", str(out), "--doc", str(doc)]
    assert fidelity.main(args) == 0
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.name.split("-seed")[0] for c in cells] == ["hyperformer", "none"]
    record = json.loads(cells[0].read_text())
    tasks = {"synthetic/first", "synthetic/last", "synthetic/copy", fidelity.LOW_RESOURCE_TASK}
    assert set(record["scores"]) == tasks and record["conditioning_params"] > 0
    text = doc.read_text()
    assert "| hyperformer |" in text and "| none |" in text
    assert (doc.parent / "fidelity.png").stat().st_size > 0

    # a hand-written note survives; cached cells are not retrained, a new cell is
    doc.write_text(text + "our reading: keep me\n")
    capsys.readouterr()
    assert fidelity.main(args[:1] + ["none", "hyperprompt_sep"] + args[3:]) == 0
    assert "1 cached" in capsys.readouterr().out and "keep me" in doc.read_text()
    assert "hyperprompt_sep > none" in doc.read_text()  # the paper's claim, checked on what was measured


def test_a_changed_setting_is_never_mixed_with_stale_cells(tmp_path):
    a = fidelity.StudyConfig(steps=3)
    b = fidelity.StudyConfig(steps=4)
    assert a.key() != b.key()
    assert fidelity.cell_path(tmp_path, a, "none", 0) != fidelity.cell_path(tmp_path, b, "none", 0)


def test_cell_index_out_of_range_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main(["--variants", "none", "--seeds", "0", "1", "--cell", "2"])
    assert exit_info.value.code == 2
    assert "--cell 2: expected 0..1" in capsys.readouterr().err
