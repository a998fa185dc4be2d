"""Preemption: a signal on one rank stops every rank at the same step boundary."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from hp_deepspeed.testing.ranks import run_ranks
from hp_deepspeed.training.preemption import EXIT_PREEMPTED, PreemptionConfig, PreemptionHandler


def preempt_rank1_at_step3(max_steps: int) -> dict:
    """Rank 1 signals itself during step 3; every rank must decide to stop at step 3."""
    handler = PreemptionHandler().install()
    stopped_at = None
    try:
        for step in range(1, max_steps + 1):
            if dist.get_rank() == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if handler.should_stop(step):
                stopped_at = step
                break
    finally:
        handler.restore()
    return {
        "stopped_at": stopped_at,
        "received": handler.received,
        "handler_restored": signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,
    }


@pytest.mark.distributed
def test_signal_on_one_rank_stops_all_ranks_at_the_same_step():
    results = run_ranks("tests.checkpointing.test_preemption:preempt_rank1_at_step3", 2, timeout=120, args=(10,))
    assert [r["stopped_at"] for r in results] == [3, 3]
    assert results[0]["received"] is None  # rank 0 stopped only because of the agreement
    assert results[1]["received"] == signal.SIGUSR1
    assert all(r["handler_restored"] for r in results)


def test_handler_only_flags_and_restores_previous_handlers():
    # No process group here: should_stop falls back to the local flag.
    previous = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler(PreemptionConfig(check_every=2))
    with handler:
        assert signal.getsignal(signal.SIGTERM) == handler._on_signal
        assert not handler.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill pytest if the handler did not catch it
        assert handler.received == signal.SIGTERM
        assert not handler.should_stop(3)  # not a check step: no decision yet
        assert handler.should_stop(4) and handler.stop_step == 4
        assert handler.should_stop(5)  # once decided, it stays decided
    assert signal.getsignal(signal.SIGTERM) == previous
    assert EXIT_PREEMPTED == os.EX_TEMPFAIL


def test_config_rejects_unknown_signal_and_bad_interval():
    with pytest.raises(ValueError, match="SIGFOO"):
        PreemptionConfig(signals=["SIGFOO"])
    with pytest.raises(ValueError, match="check_every"):
        PreemptionConfig(check_every=0)
