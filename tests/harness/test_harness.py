"""The distributed harness itself: real ranks talk, and a hung rank fails loudly in bounded time."""

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hp_deepspeed.testing.ranks import DistributedTestError, free_port, run_command, run_ranks

pytestmark = pytest.mark.distributed
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def allreduce_body(value: float) -> float:
    tensor = torch.tensor([value * (dist.get_rank() + 1)])
    dist.all_reduce(tensor)
    return tensor.item()


def hang_on_rank1_body() -> None:
    if dist.get_rank() == 1:
        time.sleep(3600)  # never joins the collective
    tensor = torch.ones(1)
    dist.all_reduce(tensor)


def crash_on_rank0_body() -> None:
    if dist.get_rank() == 0:
        raise RuntimeError("deliberate failure on rank 0")
    dist.barrier()


def test_two_rank_allreduce():
    assert run_ranks("tests.harness.test_harness:allreduce_body", 2, timeout=120, args=(1.5,)) == [4.5, 4.5]


def test_hung_rank_times_out_with_clear_error():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_ranks("tests.harness.test_harness:hang_on_rank1_body", 2, timeout=10)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "timed out after 10s" in message and "--- rank 1" in message


def test_crashed_rank_reports_its_traceback_and_frees_the_others():
    with pytest.raises(DistributedTestError) as err:
        run_ranks("tests.harness.test_harness:crash_on_rank0_body", 2, timeout=120)
    assert "deliberate failure on rank 0" in str(err.value)


def test_deepspeed_launcher_two_ranks(tmp_path):
    out = run_command(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
         str(SCRIPTS / "ds_allreduce.py"), "--out", str(tmp_path)],
        timeout=240,
    )
    results = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert results == ["3.0", "3.0"], out.output[-3000:]


def test_command_timeout_kills_and_reports():
    with pytest.raises(DistributedTestError, match="timed out after 2s"):
        run_command([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(600)"], timeout=2)
