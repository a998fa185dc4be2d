"""Preemption: a signal on one rank stops every rank at the same step boundary."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from hp_deepspeed.launching import collectives
from hp_deepspeed.testing.ranks import run_ranks
from hp_deepspeed.training.preemption import EXIT_PREEMPTED, PreemptionConfig, PreemptionHandler


def preempt_rank1_at_step3(max_steps: int) -> dict:
    """Rank 1 signals itself during step 3; every rank must decide to stop at step 4, when the
    agreement started at step 3 is read."""
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
    assert [r["stopped_at"] for r in results] == [4, 4]
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


def test_a_rank_among_others_never_waits_for_the_agreement_it_starts_at_a_step(monkeypatch):
    events = []

    def start(value, op):
        started = len([e for e in events if e[0] == "start"])
        events.append(("start", started, int(value)))

        def read():
            events.append(("read", started))
            return int(value)
        return read

    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(collectives, "start_flag_agreement", start)
    handler = PreemptionHandler(PreemptionConfig(signals=[]))
    assert not handler.should_stop(1)
    assert events == [("start", 0, 0)]  # started, not read: the host goes on with step 2
    handler.received = signal.SIGTERM
    assert not handler.should_stop(2)  # reads step 1's agreement (no signal), sends its own flag
    assert events[1:] == [("read", 0), ("start", 1, 1)]
    assert handler.should_stop(3) and handler.stop_step == 3
    assert events[3:] == [("read", 1)]  # decided on step 2's flags; nothing more is sent
    handler.finish()
    assert events[4:] == []


def test_the_agreement_in_flight_at_the_end_is_waited_for_unless_the_rank_is_failing(monkeypatch):
    reads = []
    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(collectives, "start_flag_agreement", lambda value, op: lambda: reads.append(1) or 0)
    handler = PreemptionHandler(PreemptionConfig(signals=[]))
    handler.should_stop(1)
    handler.finish()
    assert reads == [1]
    handler.should_stop(2)
    handler.finish(failing=True)
    assert reads == [1] and handler._agreement is None


def test_config_rejects_unknown_signal_and_bad_interval():
    with pytest.raises(ValueError, match="SIGFOO"):
        PreemptionConfig(signals=["SIGFOO"])
    with pytest.raises(ValueError, match="check_every"):
        PreemptionConfig(check_every=0)
