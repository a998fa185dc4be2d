"""The non-finite guard in one process: ordinary steps never read the device, and a settle
replays the unread steps with the per-step rule (the command-line behaviour is in
tests/test_faults_cli.py)."""

from __future__ import annotations

import math

import pytest
import torch

from hp_deepspeed.launching import collectives
from hp_deepspeed.training import nonfinite
from hp_deepspeed.training.nonfinite import NonFiniteGuard, NonFiniteLoss

FINITE, NAN = torch.tensor(2.5), torch.tensor(math.nan)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts of the guard's host reads of tensors and of its all-reduces."""
    counts = {"read": 0, "all_reduce": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["read"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def all_reduce(tensor, op="sum", _original=collectives.all_reduce):
        counts["all_reduce"] += 1
        return _original(tensor, op)

    monkeypatch.setattr(nonfinite.collectives, "all_reduce", all_reduce)
    return counts


def test_ordinary_steps_neither_read_the_device_nor_communicate_until_settle(host_reads):
    guard = NonFiniteGuard(max_consecutive=3)
    for step in range(1, 11):
        guard.observe(step, FINITE * step, torch.tensor(0.5), True)
    assert host_reads == {"read": 0, "all_reduce": 0} and guard.pending == 10
    guard.settle()  # one all-reduce and one host read for the ten steps
    assert host_reads == {"read": 1, "all_reduce": 1}
    assert guard.finite and guard.pending == 0


def test_the_verdict_is_refused_while_observed_steps_are_unread():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.observe(1, NAN, None, True)
    with pytest.raises(RuntimeError, match="before settle"):
        guard.finite
    guard.settle()
    assert not guard.finite


def test_a_run_of_max_steps_stops_at_the_check_even_when_finite_steps_followed_it():
    guard = NonFiniteGuard(max_consecutive=3)
    for step, loss in enumerate([FINITE, NAN, NAN, NAN, FINITE, FINITE], start=1):
        guard.observe(step, loss, torch.tensor(1.0), True)
    with pytest.raises(NonFiniteLoss) as stopped:
        guard.settle()
    assert str(stopped.value).startswith(
        "training stopped at step 6: non-finite loss or gradients for 3 step(s) in a row since step 2 "
        "(training.max_nonfinite_steps=3; reached at step 4, checked at step 6)")


def test_runs_shorter_than_max_across_settles_count_as_one_run_and_a_finite_step_resets_it():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.observe(1, NAN, None, True)
    guard.observe(2, FINITE, math.inf, True)  # a host-known gradient norm counts too
    guard.settle()
    assert not guard.finite and guard.consecutive == 2 and guard.first_bad_step == 1
    guard.observe(3, FINITE, torch.tensor(1.0), True)
    guard.settle()
    assert guard.finite and guard.first_bad_step is None
    guard.observe(4, FINITE, torch.tensor(math.nan), True)
    guard.observe(5, FINITE, torch.tensor(1.0), False)  # DeepSpeed skipped the update
    guard.settle()
    guard.observe(6, NAN, torch.tensor(1.0), True)
    with pytest.raises(NonFiniteLoss, match=r"^training stopped at step 6: .* for 3 step\(s\) in a row since step 4 "):
        guard.settle()
    assert guard.skipped_updates == 1
