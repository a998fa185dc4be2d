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
    cold = [{"dd_read_s": 2.0, "dd_read_n_s": 1.0, "verify_s": 1.5, "load_s": 0.5, "cold": True,
             "not_cold_because": None, "loadavg_1min": [0.5, 0.7]}]
    warm = [dict(cold[0], cold=False, dd_read_s=1.0, verify_s=0.75, load_s=0.5)]
    row = checkpoint_io.model_row(saved, {"cold": cold, "warm": warm})
    data = {"benchmark": "checkpoint_io", "ranks": 1, "zero_stage": 3, "precision": "fp32", "saves": 2, "loads": 1,
            "dd_streams": 8,
            "models": {"t5-base": row},
            "machine": {"utc": "2026-12-06T11:00:00Z", "cpu_model": "x", "cpu_count": 2,
                        "loadavg_1_5_15": [0.5, 0.6, 0.7], "torch": "2.13.0", "torch_threads": 1}}
    assert report.RENDER["checkpoint_io"] is report.checkpoint
    text = report.checkpoint(data)
    assert "| t5-base | 300 | 4000 | 3 | 1.33 | 2 | 1.00, 0.50 |" in text
    assert "resume / dd with 8 streams per round" in text
    assert "| t5-base | cold | 1.50 + 0.50 | 2 | 2 | 1.00 | 0.50 | 0.5-0.7 |" in text
    assert "| t5-base | warm | 0.75 + 0.50 | 3.2 | 4 | 0.80 | 0.80 | 0.5-0.7 |" in text
    assert "could not be dropped" not in text


def test_each_resume_round_prints_its_load_both_dd_readings_and_both_ratios_then_the_medians():
    rounds = [{"dd_read_s": 1.0, "dd_read_n_s": 0.5, "verify_s": 0.8, "load_s": 0.2, "cold": True,
               "loadavg_1min": [1.0, 2.0, 1.5]},
              {"dd_read_s": 3.0, "dd_read_n_s": 2.0, "verify_s": 1.5, "load_s": 0.5, "cold": True,
               "loadavg_1min": [3.0, 3.5]}]
    rows = checkpoint_io._load_rows(rounds, size=10**9)
    assert rows["resume_over_dd_n_per_round"] == [0.5, 1.0]
    assert rows["resume_over_dd_n_median"] == 0.75
    lines = checkpoint_io.round_lines("t5-base", "cold", rows).splitlines()
    assert lines[0].split("  ")[0] == "round" and f"dd {checkpoint_io.DD_STREAMS} streams s" in lines[0]
    assert lines[2].split() == ["t5-base", "cold", "1", "1.0-2.0", "1", "0.5", "0.80", "+", "0.20", "1", "0.5"]
    assert lines[3].split() == ["t5-base", "cold", "2", "3.0-3.5", "3", "2", "1.50", "+", "0.50", "1.5", "1"]
    assert lines[4].split() == ["t5-base", "cold", "median", "1.0-3.5", "2", "1.25", "1.50", "1.25", "0.75"]


def test_a_round_waits_for_the_load_to_fall_below_the_threshold_but_no_longer_than_its_patience(monkeypatch):
    loads = iter([6.0, 4.0, 1.0, 1.0])
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(checkpoint_io.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(checkpoint_io.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(checkpoint_io.time, "sleep", lambda s: None)
    assert checkpoint_io.wait_for_quiet(2.0, 300) == 1.0
    monkeypatch.setattr(checkpoint_io.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert checkpoint_io.wait_for_quiet(2.0, 20) == 9.0  # gave up after its patience
