"""`make test` runs two pytest-xdist workers (Makefile); the root conftest puts every module that
holds a multi-process test (marked e2e or distributed) into one of two xdist groups: the
launcher and cluster modules (tests/launching) and the others. Run on a synthetic suite with
pytester: each group's modules run on one worker, one test after another, and every other
module runs whole on one worker, so its module fixtures are built once. It fails if the
grouping is lost, as it silently is with pytest-xdist 3.8 under pytest 9.2 (setup.cfg pins
pytest below it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("xdist")

ROOT_CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()

RANKS = """
import time
import pytest

pytestmark = pytest.mark.{marker}

@pytest.mark.parametrize("i", range(4))
def test_ranks(i):
    time.sleep(0.05)
"""

MIXED = """
import time
import pytest

@pytest.mark.distributed
def test_two_ranks():
    time.sleep(0.05)

@pytest.mark.parametrize("i", range(3))
def test_unit_beside_them(i):
    time.sleep(0.05)
"""

UNITS = """
import time
import pytest

@pytest.mark.parametrize("i", range(8))
def test_unit(i):
    time.sleep(0.05)
"""


def test_each_group_of_multi_process_modules_runs_on_one_worker(pytester):
    pytester.makeconftest(ROOT_CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makeini("[pytest]\nmarkers =\n    e2e: x\n    distributed: x\n")
    pytester.makepyfile(test_e2e=RANKS.format(marker="e2e"), test_dist=RANKS.format(marker="distributed"),
                        test_mixed=MIXED, test_units=UNITS)
    launching = pytester.mkdir("launching")
    (launching / "test_cluster.py").write_text(RANKS.format(marker="e2e"))
    (launching / "test_signals.py").write_text(MIXED)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=28)
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"\[(gw\d)\].*PASSED (?:launching/)?(test_\w+)\.py", result.stdout.str()):
        workers.setdefault(module, set()).add(worker)
    assert all(len(ran_on) == 1 for ran_on in workers.values()), f"a module was split between workers: {workers}"
    ranks = workers["test_e2e"] | workers["test_dist"] | workers["test_mixed"]
    cluster = workers["test_cluster"] | workers["test_signals"]
    assert len(ranks) == 1 and len(cluster) == 1, workers
