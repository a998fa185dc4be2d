"""The conditioning module alone: forward + backward time of each variant's generator.

    python -m bench.conditioning_cost [--presets t5-small t5-base] [--tasks 1 8] [--rounds 5] [--out PATH]

Single process, fp32. For each preset and number of distinct tasks in the batch, every
variant's ``TaskConditioning`` is called on the task ids and the sum of all generated tensors is
back-propagated: the per-step cost that a variant adds *before* the backbone sees its prompts or
adapters (the backbone's own extra work, e.g. 16 more key/value slots per self-attention, is in
``bench.step_time``). It is independent of the batch size and sequence length, so it weighs most
on small batches. Variants interleaved, medians reported.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import interleave, median, table, write_json
from hp_deepspeed.model.conditioning import BackboneDims, ConditioningConfig, build_conditioning
from hp_deepspeed.model.t5_config import PRESETS

VARIANTS = ("hyperprompt_share", "hyperprompt_sep", "hyperprompt_global", "kv_prompt", "prompt_tuning", "hyperformer")
NUM_TASKS = 8


def measure(preset: str, tasks: int, rounds: int) -> dict:
    dims = BackboneDims.of(PRESETS[preset])
    task_ids = torch.arange(tasks) % NUM_TASKS
    modules = {}
    for v in VARIANTS:
        torch.manual_seed(0)
        modules[v] = build_conditioning(ConditioningConfig(variant=v), dims, NUM_TASKS)

    def step_of(module):
        def step():
            out = module(task_ids)
            tensors = [out.input_prompt] + [x for layer in (out.encoder or []) + (out.decoder or [])
                                          for x in layer.as_args()]
            sum(x.float().sum() for x in tensors if x is not None).backward()
            module.zero_grad(set_to_none=True)
        return step

    times = interleave({v: step_of(m) for v, m in modules.items()}, rounds=rounds, warmup=1)
    return {"preset": preset, "distinct_tasks": tasks, "rounds": rounds,
            "variants": {v: {"fwd_bwd_s_median": median(ts), "fwd_bwd_s_all": ts,
                             "params": sum(p.numel() for p in modules[v].parameters())} for v, ts in times.items()}}


def run(presets=("t5-small", "t5-base"), tasks=(1, 8), rounds=5, out="conditioning_cost") -> dict:
    results = []
    for preset in presets:
        for t in tasks:
            res = measure(preset, t, rounds)
            results.append(res)
            print(f"== {preset}, {t} distinct task(s)")
            print(table(["variant", "fwd+bwd ms (median)", "params"],
                        [[v, r["fwd_bwd_s_median"] * 1e3, r["params"]] for v, r in res["variants"].items()]))
    result = {"benchmark": "conditioning_cost", "results": results}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["t5-small", "t5-base"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="conditioning_cost")
    args = parser.parse_args(argv)
    run(args.presets, args.tasks, args.rounds, args.out)


if __name__ == "__main__":
    main()
