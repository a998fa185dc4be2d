"""bench.checkpoint_io's checks before any engine is built, how it turns rounds into ratios, and
bench.report's table of what it writes."""

from __future__ import annotations

from collections import namedtuple

import pytest

from bench import checkpoint_io, report


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


def test_the_report_renders_every_field_checkpoint_io_writes():
    saved = {"save_s_all": [2.0, 4.0], "dd_write_s_all": [2.0, 2.0], "checkpoint_bytes": 4 * 10**9,
             "dd_bytes": 4 * 10**9, "params": 3 * 10**8}
    cold = [{"dd_read_s": 2.0, "verify_s": 1.5, "load_s": 0.5, "cold": True, "not_cold_because": None,
             "loadavg_1min": [0.5, 0.7]}]
    warm = [dict(cold[0], cold=False, dd_read_s=1.0, verify_s=0.75, load_s=0.5)]
    row = checkpoint_io.model_row(saved, {"cold": cold, "warm": warm})
    data = {"benchmark": "checkpoint_io", "ranks": 1, "zero_stage": 3, "precision": "fp32", "saves": 2, "loads": 1,
            "models": {"t5-base": row},
            "machine": {"utc": "2026-12-06T11:00:00Z", "cpu_model": "x", "cpu_count": 2,
                        "loadavg_1_5_15": [0.5, 0.6, 0.7], "torch": "2.13.0", "torch_threads": 1}}
    assert report.RENDER["checkpoint_io"] is report.checkpoint
    text = report.checkpoint(data)
    assert "| t5-base | 300 | 4000 | 3 | 1.33 | 2 | 1.00, 0.50 |" in text
    assert "| t5-base | cold | 1.50 + 0.50 | 2 | 2 | 1.00 | 0.5-0.7 |" in text
    assert "| t5-base | warm | 0.75 + 0.50 | 3.2 | 4 | 0.80 | 0.5-0.7 |" in text
    assert "could not be dropped" not in text
