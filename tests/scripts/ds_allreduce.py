"""Started by the real `deepspeed` launcher in tests: each rank all-reduces rank+1 and writes it."""

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from hp_deepspeed.launching.distributed import shutdown_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)  # passed by the launcher
args = parser.parse_args()
deepspeed.init_distributed(dist_backend="gloo")
tensor = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(tensor)
Path(args.out, f"rank{dist.get_rank()}.txt").write_text(str(tensor.item()))
shutdown_distributed()  # a clean exit, as the CLI does
