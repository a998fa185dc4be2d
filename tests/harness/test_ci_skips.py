"""The root conftest's CI rule, run on synthetic suites with pytester: with CI=true a skipped
integration (e2e/distributed) test fails; unit tests may still skip; outside CI skips stay skips."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT_CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()

SUITE = """
import pytest

@pytest.mark.e2e
def test_slurm():
    pytest.skip("no sbatch")

@pytest.mark.distributed
def test_zero3(needs_mpi):
    pass

@pytest.fixture
def needs_mpi():
    pytest.skip("no mpirun")

def test_unit():
    pytest.skip("optional dependency")

@pytest.mark.e2e
@pytest.mark.xfail(reason="known bug")
def test_expected_failure():
    assert False

@pytest.mark.e2e
def test_runs():
    pass
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(ROOT_CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makeini("[pytest]\nmarkers =\n    e2e: x\n    distributed: x\n")
    pytester.makepyfile(test_suite=SUITE)
    return pytester


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_in_ci_a_skipped_integration_test_fails(suite, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=1, xfailed=1)
    result.stdout.fnmatch_lines(["*CI=true: integration test (marked e2e) was skipped*no sbatch*"])
    result.stdout.fnmatch_lines(["*marked distributed) was skipped*no mpirun*"])


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_skips_stay_skips(suite, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=3, xfailed=1)


def test_in_ci_a_module_skipped_at_import_fails(pytester, monkeypatch):
    pytester.makeconftest(ROOT_CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(test_mpi="import pytest\npytest.importorskip('no_such_mpi_module')\n"
                                 "def test_x():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skipped at import*no_such_mpi_module*"])
    monkeypatch.delenv("CI")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=1)
