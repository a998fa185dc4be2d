"""The GPU smoke check (bench/gpu_smoke.py) keeps working: its CPU mode runs a subset of stages.

The full check (every stage, three DeepSpeed configs) is for a GPU machine; here one short run
through launch/local.sh, its export and a prediction run on the CPU, and the bookkeeping of a
failed stage is checked without starting anything.
"""

from __future__ import annotations

import json

import pytest

from bench import gpu_smoke


def test_a_stage_without_its_input_fails_and_the_check_exits_nonzero(tmp_path, capsys):
    assert gpu_smoke.main(["--cpu", "--stages", "predict", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  zero3_cpu_test/predict" in out and "needs zero3_cpu_test/export" in out
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["passed"] is False and report["stages"][0]["name"] == "zero3_cpu_test/predict"


def test_bad_arguments_exit_2_before_running_anything(tmp_path, capsys):
    assert gpu_smoke.main(["--stages", "train,fly", "--out", str(tmp_path)]) == 2
    assert "unknown stages ['fly']" in capsys.readouterr().err
    assert not (tmp_path / "smoke.json").exists()


@pytest.mark.distributed
def test_cpu_mode_trains_exports_and_predicts(tmp_path, capsys):
    code = gpu_smoke.main(["--cpu", "--stages", "train,export,predict", "--timeout", "400", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert [line.split()[0] for line in out.splitlines() if "zero3_cpu_test/" in line] == ["PASS"] * 3
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["passed"] and report["device"] == "cpu"
