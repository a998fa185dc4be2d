"""bench/packing_step.py times the same micro-batches packed and unpacked; here on a tiny model."""

from pathlib import Path

from bench import packing_step

REPO = Path(__file__).resolve().parents[2]


def test_the_packing_step_bench_times_both_layouts_of_the_same_micro_batches(tmp_path):
    result = packing_step.measure(preset=str(REPO / "configs" / "models" / "t5-demo"), batches=2, rounds=1, examples=200, cache_dir=str(tmp_path))
    assert len(result["times_s"]["packed"]) == len(result["times_s"]["unpacked"]) == 2
    assert result["packed"]["rows"] < result["unpacked"]["rows"] == 16
