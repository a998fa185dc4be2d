"""bench.checkpoint_io's checks before any engine is built, and how it turns rounds into ratios."""

from __future__ import annotations

from collections import namedtuple

import pytest

from bench import checkpoint_io


def test_a_t5_base_run_on_a_disk_without_room_stops_with_one_line_before_any_rank_starts(monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 3 * 10**9, 3 * 10**9))

    def no_ranks(*args, **kwargs):
        raise AssertionError("a rank was started")

    monkeypatch.setattr("hp_deepspeed.testing.ranks.run_ranks", no_ranks)
    with pytest.raises(SystemExit, match=r"3\.0 GB free, a t5-base checkpoint run needs 12 GB"):
        checkpoint_io.main(["--t5-base"])


def test_resume_against_dd_is_per_round_and_cold_only_when_every_round_was():
    rounds = [{"dd_read_s": 1.0, "verify_s": 1.0, "load_s": 3.0, "cold": True, "loadavg_1min": [5.0, 6.0]},
              {"dd_read_s": 2.0, "verify_s": 1.0, "load_s": 1.0, "cold": False, "loadavg_1min": [4.0, 7.5]}]
    rows = checkpoint_io._load_rows(rounds, size=4 * 10**9)
    assert rows["resume_over_dd_per_round"] == [0.25, 1.0]
    assert rows["resume_gb_per_s"] == 4 / 3.0  # median of 4 s and 2 s
    assert rows["loadavg_1min"] == [4.0, 7.5]
    assert rows["cold"] is False
