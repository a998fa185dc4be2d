"""HyperPrompt's cost and the CPU "MFU": training-step time of every conditioning variant.

    python -m bench.step_time [--presets t5-small t5-base] [--seq-lens 128 512]
                              [--variants none hyperprompt_global ...] [--rounds 3] [--out PATH]

One process, plain PyTorch, fp32, random initialisation (``load_weights: false``). For each
(preset, input length) one backbone is built and shared by every variant's conditioning module
(``HyperPromptT5(backbone, conditioning)``), so all variants run the very same backbone weights
and memory stays at one model. One ``torch.optim.AdamW`` holds every parameter; a step is
forward + backward + ``optimizer.step()`` + ``zero_grad(set_to_none=True)``, and AdamW only
touches parameters that received a gradient (the backbone and the active variant's module), so
each variant's step costs exactly what its own training step costs. Variants are interleaved
(round r starts at variant r), and the table reports median step times and the ratio to
``none`` (the backbone without conditioning).

Achieved FLOP/s use ``hp_deepspeed.training.flops.train_step_flops`` (model FLOPs: matmuls,
3x forward, prompt slots included); the "MFU" column divides them by the fp32 ``torch.matmul``
peak of this process measured in the same run (before and after the steps; the higher is used).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import interleave, machine, matmul_peak_gflops, median, ratios, table, write_json
from hp_deepspeed.model.builder import ModelConfig
from hp_deepspeed.model.builder import build_backbone
from hp_deepspeed.model.conditioning import BackboneDims, ConditioningConfig, build_conditioning
from hp_deepspeed.model.hyperprompt_t5 import HyperPromptT5
from hp_deepspeed.training.flops import shape_of, train_step_flops

VARIANTS = ("none", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global",
            "kv_prompt", "prompt_tuning", "hyperformer")
NUM_TASKS = 8
# Micro-batch per preset: small enough that t5-base at 512 tokens fits a few steps on 2 cores.
DEFAULT_BATCH = {"t5-small": 4, "t5-base": 1}


def make_batch(vocab: int, batch: int, enc_len: int, dec_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, enc_len), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.randint(2, vocab, (batch, dec_len), generator=g),
        "task_ids": torch.arange(batch) % NUM_TASKS,
    }


def measure(preset: str, enc_len: int, dec_len: int, batch: int, variants=VARIANTS, rounds: int = 3,
            warmup: int = 1, prompt_length: int = 16) -> dict:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(name_or_path=preset, load_weights=False))
    backbone.train()
    dims = BackboneDims.of(backbone.config)
    models, extra_enc = {}, {}
    for variant in variants:
        cfg = ConditioningConfig(variant=variant, prompt_length=prompt_length)
        cond = build_conditioning(cfg, dims, NUM_TASKS)
        models[variant] = HyperPromptT5(backbone, cond, kv_prompt_length=cfg.kv_prompt_length).train()
        extra_enc[variant] = cfg.input_prompt_length
    params = {id(p): p for m in models.values() for p in m.parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    data = make_batch(backbone.config.vocab_size, batch, enc_len, dec_len)

    def step_of(model):
        def step():
            out = model(data["input_ids"], data["attention_mask"], labels=data["labels"],
                        task_ids=None if model.conditioning is None else data["task_ids"])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    peak_before = matmul_peak_gflops()
    times = interleave({v: step_of(m) for v, m in models.items()}, rounds=rounds, warmup=warmup)
    peak = max(peak_before, matmul_peak_gflops())
    shape = shape_of(backbone.config)
    rel = ratios(times, "none") if "none" in times else {}
    rows = {}
    for variant, ts in times.items():
        flops = train_step_flops(shape, batch, enc_len + extra_enc[variant], dec_len, models[variant].kv_prompt_length)
        med = median(ts)
        cond_params = sum(p.numel() for p in models[variant].conditioning.parameters()) if models[variant].conditioning else 0
        rows[variant] = {
            "step_s_median": med, "step_s_min": min(ts), "step_s_all": ts,
            "ratio_to_none": rel[variant]["ratio_median"] if rel else None,
            "ratio_to_none_min": rel[variant]["ratio_min"] if rel else None,
            "ratio_to_none_paired": rel[variant]["ratio_paired_median"] if rel else None,
            "model_tflop_per_step": flops / 1e12,
            "achieved_gflops": flops / med / 1e9,
            "mfu_vs_matmul_peak": flops / med / 1e9 / peak,
            "conditioning_params": cond_params,
        }
    return {"preset": preset, "enc_len": enc_len, "dec_len": dec_len, "batch": batch,
            "prompt_length": prompt_length, "rounds": rounds, "warmup": warmup,
            "backbone_params": sum(p.numel() for p in backbone.parameters()),
            "matmul_peak_gflops": peak, "matmul_peak_gflops_before": peak_before, "variants": rows}


def run(presets, seq_lens, variants, rounds, dec_len, batches, out) -> dict:
    results = []
    for preset in presets:
        for enc_len in seq_lens:
            batch = batches.get(preset, 1)
            print(f"== {preset} enc_len={enc_len} dec_len={dec_len} batch={batch} rounds={rounds} "
                  f"load={machine()['loadavg_1_5_15']}", flush=True)
            res = measure(preset, enc_len, dec_len, batch, variants, rounds)
            results.append(res)
            print(table(
                ["variant", "step s (median)", "step s (min)", "x none (medians)", "x none (mins)", "x none (paired)",
                 "cond params", "GFLOP/s", "MFU vs matmul"],
                [[v, r["step_s_median"], r["step_s_min"]] + ([r["ratio_to_none"], r["ratio_to_none_min"],
                  r["ratio_to_none_paired"]] if r["ratio_to_none"] else ["-"] * 3)
                 + [r["conditioning_params"], r["achieved_gflops"], r["mfu_vs_matmul_peak"]]
                 for v, r in res["variants"].items()],
            ))
            print(f"matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s (fp32, {torch.get_num_threads()} thread(s))\n",
                  flush=True)
    result = {"benchmark": "step_time", "results": results}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["t5-small", "t5-base"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--dec-len", type=int, default=32, help="target length (labels)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch for every preset (default per preset)")
    parser.add_argument("--out", default="step_time")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    batches = {p: args.batch for p in args.presets} if args.batch else DEFAULT_BATCH
    run(args.presets, args.seq_lens, args.variants, args.rounds, args.dec_len, batches, args.out)


if __name__ == "__main__":
    main()
