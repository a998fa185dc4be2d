"""Throughput against the alternative: transformers' T5ForConditionalGeneration on the same ZeRO-3.

    python -m bench.hf_throughput [--preset t5-small] [--enc-len 128] [--dec-len 32] [--batch 4]
                                  [--rounds 4] [--ranks 2] [--out PATH]

``--ranks`` gloo ranks on the CPU (``hp_deepspeed.testing.ranks.run_ranks``), fp32. Every
rank builds three DeepSpeed engines from the same config (``ds_configs/zero3_cpu_test.json``
completed by ``build_ds_config``: ZeRO-3, torch AdamW, clipping 1.0), each inside
``deepspeed.zero.Init``, random initialisation of the same architecture:

* ``ours_hyperprompt_global``: ``hyperprompt_t5.build_model`` with HyperPrompt-Global (l=16);
* ``ours_none``: the same backbone code without conditioning (separates HyperPrompt's cost
  from the backbone implementation);
* ``hf_t5``: ``transformers.T5ForConditionalGeneration`` (its default attention implementation).

The engines take turns, one training step each (forward, ``engine.backward``, ``engine.step``),
on the same per-rank batch (random tokens, no padding), for ``rounds`` rounds after a warm-up
step; rank 0 reports median step times. Tokens/s counts input + target tokens of all ranks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import median, ratios, table, write_json

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8


def rank_body(preset: str, enc_len: int, dec_len: int, batch: int, rounds: int, warmup: int) -> dict:
    import deepspeed
    import torch.distributed as dist
    import transformers

    from hp_deepspeed.launching import collectives
    from hp_deepspeed.model.builder import ModelConfig, resolve_t5_config
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
    from hp_deepspeed.training.optim import OptimConfig

    deepspeed.init_distributed(dist_backend="gloo")  # adopts run_ranks' process group
    rank, world = dist.get_rank(), dist.get_world_size()
    t5_config = resolve_t5_config(ModelConfig(name_or_path=preset, load_weights=False))
    ds_config = build_ds_config(
        read_ds_config(REPO / "ds_configs" / "zero3_cpu_test.json"), micro_batch_size=batch,
        gradient_accumulation=1, world_size=world, optim=OptimConfig(), d_model=t5_config.d_model,
        log_every=1000, on_cpu=True,
    )

    def engine_of(model):
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
        engine.train()
        return engine

    engines = {}
    for variant in ("hyperprompt_global", "none"):
        model = build_model(ModelConfig(name_or_path=preset, load_weights=False),
                            ConditioningConfig(variant=variant), NUM_TASKS, ds_config=ds_config)
        engines[f"ours_{variant}"] = engine_of(model)
    hf_config = transformers.T5Config(**t5_config.to_hf_dict())
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        hf_model = transformers.T5ForConditionalGeneration(hf_config)
    engines["hf_t5"] = engine_of(hf_model)
    attn_impl = getattr(hf_model.config, "_attn_implementation", None)

    g = torch.Generator().manual_seed(1000 + rank)
    input_ids = torch.randint(2, t5_config.vocab_size, (batch, enc_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, t5_config.vocab_size, (batch, dec_len), generator=g)
    task_ids = torch.arange(batch) % NUM_TASKS

    def step(name):
        engine = engines[name]
        collectives.barrier()
        start = time.perf_counter()
        if name == "hf_t5":
            loss = engine(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        else:
            loss = engine(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          task_ids=task_ids if name == "ours_hyperprompt_global" else None).loss
        engine.backward(loss)
        engine.step()
        collectives.barrier()
        return time.perf_counter() - start

    names = list(engines)
    for _ in range(warmup):
        for name in names:
            step(name)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(name))
    counts = {name: {"params": sum(p.ds_numel for p in e.module.parameters()),
                     "param_tensors": sum(1 for _ in e.module.parameters()),
                     "modules": sum(1 for _ in e.module.modules())} for name, e in engines.items()}
    return {"times": times, "counts": counts, "hf_attn_implementation": attn_impl,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}


def run(preset="t5-small", enc_len=128, dec_len=32, batch=4, rounds=4, warmup=1, ranks=2,
        out="hf_throughput", timeout=1800) -> dict:
    from hp_deepspeed.testing.ranks import run_ranks

    results = run_ranks("bench.hf_throughput:rank_body", ranks, timeout=timeout,
                        args=(preset, enc_len, dec_len, batch, rounds, warmup))
    r0 = results[0]
    tokens = ranks * batch * (enc_len + dec_len)
    rows = {}
    for name, ts in r0["times"].items():
        rows[name] = {"step_s_median": median(ts), "step_s_all": ts, "tokens_per_s": tokens / median(ts),
                      **r0["counts"][name]}
    hf = rows["hf_t5"]["tokens_per_s"]
    rel = ratios(r0["times"], "hf_t5")
    for name, row in rows.items():
        row["throughput_vs_hf"] = row["tokens_per_s"] / hf  # = 1 / ratio of median step times
        row["throughput_vs_hf_min"] = 1 / rel[name]["ratio_min"]
        row["throughput_vs_hf_paired"] = 1 / rel[name]["ratio_paired_median"]
    print(table(["model", "step s (median)", "tokens/s", "x hf_t5 (medians)", "x hf_t5 (mins)", "x hf_t5 (paired)",
                 "param tensors"],
                [[n, r["step_s_median"], r["tokens_per_s"], r["throughput_vs_hf"], r["throughput_vs_hf_min"],
                  r["throughput_vs_hf_paired"], r["param_tensors"]]
                 for n, r in rows.items()]))
    print(f"HF attention implementation: {r0['hf_attn_implementation']}")
    result = {"benchmark": "hf_throughput", "preset": preset, "enc_len": enc_len, "dec_len": dec_len,
              "micro_batch_per_rank": batch, "ranks": ranks, "rounds": rounds, "warmup": warmup,
              "ds_config": "ds_configs/zero3_cpu_test.json", "precision": "fp32",
              "hf_attn_implementation": r0["hf_attn_implementation"], "transformers": r0["transformers"],
              "deepspeed": r0["deepspeed"], "models": rows,
              "target": "ours_hyperprompt_global >= 1.25x hf_t5 tokens/s",
              "target_met": rows["ours_hyperprompt_global"]["throughput_vs_hf"] >= 1.25}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--enc-len", type=int, default=128)
    parser.add_argument("--dec-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="hf_throughput")
    args = parser.parse_args(argv)
    run(args.preset, args.enc_len, args.dec_len, args.batch, args.rounds, 1, args.ranks, args.out)


if __name__ == "__main__":
    main()
