"""Root test configuration: in CI, an integration test that skips is a failure.

The SLURM, pdsh and MPI tests skip when the machine lacks root, apt-get, mpi4py or mpirun. On a
developer's laptop that is the right call; on a CI machine it would let a change that breaks
them land green. So when ``CI`` is set to a true value (GitHub Actions, GitLab and most CI
systems set ``CI=true``), a skip of a test marked ``e2e`` or ``distributed`` is reported as a
failure, with the skip's reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# One compute thread per process, in the workers and every process they start (ranks inherit the
# environment): the suite keeps both cores busy with two workers, and a second OpenMP thread per
# process on top of that only contends. Measured: two concurrent copies of a planner test took
# 12.4 s with 2 threads each and 6.8 s with 1; alone, 1 and 2 threads were within noise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["pytester"]  # tests/harness/test_ci_skips.py runs synthetic suites with it

#: Markers of the tests that CI must actually run.
INTEGRATION_MARKERS = ("e2e", "distributed")


def pytest_configure(config):
    # Every process the suite starts finds DeepSpeed's CPU op where `make shm-op` built it (the
    # environment's own folder, compat.torch.environment_extensions_dir). The CLI and
    # init_distributed choose that folder themselves, but test bodies that start DeepSpeed directly
    # would use torch's per-user folder and compile the op there first (40-55 s on 2 cores).
    from hp_deepspeed.compat.torch import environment_extensions_dir

    environment_extensions_dir(os.environ)


def in_ci(environ=os.environ) -> bool:
    """Whether ``CI`` holds a true value (``true``, ``1``, ``yes``; any case)."""
    return environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # An expected failure (xfail) is reported as a skip too: that one is not a missing service.
    if not (report.skipped and in_ci() and not hasattr(report, "wasxfail")):
        return
    markers = [m for m in INTEGRATION_MARKERS if item.get_closest_marker(m)]
    if not markers:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"CI=true: integration test (marked {', '.join(markers)}) was skipped, "
                       f"which CI treats as a failure: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    # A module that skips itself at import (pytest.importorskip at the top, or
    # skip(allow_module_level=True)) hides all its tests before their markers can be read, so in
    # CI any whole-module skip fails: no module of this suite does that on purpose.
    if report.skipped and in_ci() and isinstance(collector, pytest.Module):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: module {collector.nodeid} skipped at import: {reason}"


#: The xdist group of the modules that start launchers or clusters: they share machine-wide state
#: (network namespaces, sshd, the SLURM cluster) and run one after another. Every other module
#: with a multi-process test goes into RANKS_GROUP.
CLUSTER_GROUP, RANKS_GROUP = "cluster", "ranks"
CLUSTER_DIRS = ("launching",)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    # `make test` runs the suite on two pytest-xdist workers with ``--dist loadgroup``. Every test
    # of a module that holds a test marked e2e or distributed joins one of two groups, each run
    # test after test on one worker: the launcher and cluster tests (tests/launching), which
    # share machine-wide state, and the other multi-rank tests, which share nothing but the
    # cores. So at most two multi-rank runs overlap (each rank on its own port, /dev/shm buffer
    # and run folder), and single-process tests fill the rest of both workers. Whole modules, so
    # that a module's expensive fixtures are built once; for the same reason every other module is
    # a group of its own (a module fixture that trains a model is otherwise built on both
    # workers). tests/harness/test_xdist_groups.py checks it.
    modules = {item.module for item in items
               if any(item.get_closest_marker(m) for m in INTEGRATION_MARKERS)}
    for item in items:
        if item.module in modules:
            folder = Path(str(item.path)).parent.name
            group = CLUSTER_GROUP if folder in CLUSTER_DIRS else RANKS_GROUP
        else:
            group = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_sessionstart(session):
    session.config._hp_started = time.time()


def pytest_sessionfinish(session):
    """Ranks the tests kill (SIGKILL, a crash mid-save, a node lost) never reach the CLI's clean
    exit, which removes DeepSpeed's 69 MB /dev/shm all-reduce buffer of each rank
    (launching/shutdown.shutdown_distributed); remove those this session left. Only the process
    that started the session does this (xdist's controller, or pytest alone): a worker that
    finishes first must not remove the buffers of ranks still running on the other."""
    if hasattr(session.config, "workerinput"):
        return
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if path.stat().st_mtime >= session.config._hp_started:
                path.unlink()
        except FileNotFoundError:
            pass
