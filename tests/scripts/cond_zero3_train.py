"""Started by the real `deepspeed` launcher (2 ranks, gloo, ZeRO-3, fp32) from
tests/conditioning/test_zero3.py.

1. Trains every case of tests.conditioning.zero3_cases for a few AdamW steps and writes, from
   rank 0, the mean loss of each step and the updated weights gathered with
   deepspeed.zero.GatheredParameters. The model is built plainly and partitioned by
   ``deepspeed.initialize``, so it starts from exactly the plain reference's weights; its blocks
   are ZeRO-3 leaf modules as in the trainer (``mark_leaf_blocks``) unless the case says not;
   the packed cases feed each rank its half as packed rows.
2. Builds each variant inside ``deepspeed.zero.Init`` (``build_model(..., ds_config)``, the
   trainer's path) and writes the gathered initial weights.
"""

import argparse
import json
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from hp_deepspeed.launching.distributed import shutdown_distributed
from hp_deepspeed.model.hyperprompt_t5 import build_model
from hp_deepspeed.training.parallelism import mark_leaf_blocks
from tests.conditioning import zero3_cases as cases

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)  # passed by the launcher
args = parser.parse_args()
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
out = Path(args.out)


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: param.detach().clone() for name, param in module.named_parameters()}


results, graphs, leaves = {}, {}, {}
packed = {name for name, _, _ in cases.PACKED_CASES}
for name, variant, ckpt, frozen, compiled, leaf in cases.CASES + [
        (name, variant, ckpt, False, False, True) for name, variant, ckpt in cases.PACKED_CASES]:
    started = time.perf_counter()
    graphs_before = counters["stats"]["unique_graphs"]
    model_cfg, cond_cfg = cases.configs(variant, ckpt, frozen, compiled)
    model = build_model(model_cfg, cond_cfg, num_tasks=4)
    leaves[name] = mark_leaf_blocks(model, cases.ds_config(), enabled=leaf)  # the trainer's rule
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cases.ds_config())
    engine.train()
    losses = []
    for step in range(cases.STEPS):
        batch = (cases.packed_half if name in packed else cases.rank_half)(cases.global_batch(step), rank)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    final = gathered_state(engine.module)
    if rank == 0:
        save_file(final, str(out / f"{name}.final.safetensors"))
        results[name] = losses
        graphs[name] = counters["stats"]["unique_graphs"] - graphs_before  # graphs torch.compile made
    engine.destroy()
    del engine, model
    print(f"rank {rank}: {name} trained in {time.perf_counter() - started:.1f}s", flush=True)
if rank == 0:
    (out / "losses.json").write_text(json.dumps(results))
    (out / "graphs.json").write_text(json.dumps(graphs))
    (out / "leaves.json").write_text(json.dumps(leaves))

for variant in cases.ZERO_INIT_VARIANTS:
    model = build_model(*cases.configs(variant, "none", False), num_tasks=4, ds_config=cases.ds_config())
    state = gathered_state(model)
    if rank == 0:
        save_file(state, str(out / f"zero_init.{variant}.safetensors"))

shutdown_distributed()  # a clean exit, as the CLI does
