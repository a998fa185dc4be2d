"""Run every benchmark at a size that finishes in a few minutes on a 2-core CPU machine.

    python -m bench.run_all [--only step_time conditioning_cost hf_throughput memory batching checkpoint_io]

(``make bench`` runs this.) Each benchmark writes ``bench/results/<name>.json``; this script
then prints the headline numbers against their targets (docs/benchmarks.md, "Headline"). Larger sizes: run the
benchmark modules directly (their ``--help`` lists the knobs; docs/benchmarks.md gives the
commands used for the documented numbers).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import batching, checkpoint_io, conditioning_cost, hf_throughput, memory, step_time
from bench.common import machine, table, write_json

BENCHMARKS = ("step_time", "conditioning_cost", "hf_throughput", "memory", "batching", "checkpoint_io")


def run_step_time() -> dict:
    # Every variant at t5-small; HyperPrompt-Global against none at t5-base (the target's shape).
    small = step_time.run(["t5-small"], [128, 512], list(step_time.VARIANTS), 3, 32, {"t5-small": 2},
                          "step_time_small")
    base = step_time.run(["t5-base"], [128, 512], ["none", "hyperprompt_global"], 5, 32, {"t5-base": 1},
                         "step_time_base")
    return {"small": small, "base": base}


def run_batching() -> dict:
    """8 ranks, and one rank with one micro-batch per step (where the default packs)."""
    result = batching.measure(examples=2000, micro_batch_size=16, ranks=8, batches=200)
    one_rank = batching.measure(examples=2000, micro_batch_size=16, ranks=1, batches=200,
                                modes=("stratified", "default"))
    print(batching.format_table(result), batching.format_table(one_rank), sep="\n")
    result = {"benchmark": "batching", **result, "one_rank": one_rank,
              "target": f"default: real tokens >= {batching.MIN_REAL_TOKENS}, largest task share <= "
                        f"{batching.MAX_SHARE_RATIO}x its rate, at 8 ranks and at 1",
              "target_met": result["default_meets_targets"] and one_rank["default_meets_targets"]}
    write_json("batching", result)
    return result


def headline(results: dict) -> list[list]:
    rows = []
    if "step_time" in results:
        for res in results["step_time"]["base"]["results"]:
            v = res["variants"]["hyperprompt_global"]
            r = v["ratio_to_none"]
            rows.append([f"HyperPrompt-Global step time / none, t5-base L={res['enc_len']} (medians; mins; paired)",
                         f"{r:.3f}; {v['ratio_to_none_min']:.3f}; {v['ratio_to_none_paired']:.3f}",
                         "<= 1.05", "met" if r <= 1.05 else "MISSED"])
        for res in results["step_time"]["small"]["results"] + results["step_time"]["base"]["results"]:
            m = res["variants"]["none"]["mfu_vs_matmul_peak"]
            rows.append([f"MFU vs fp32 matmul peak, {res['preset']} none L={res['enc_len']}", f"{m:.3f}", "-", "-"])
    if "hf_throughput" in results:
        models = results["hf_throughput"]["models"]
        for name in ("ours_hyperprompt_global", "ours_none"):
            m = models[name]
            r = m["throughput_vs_hf"]
            rows.append([f"tokens/s {name} / HF T5, ZeRO-3 x2 (medians; mins; paired)",
                         f"{r:.3f}; {m['throughput_vs_hf_min']:.3f}; {m['throughput_vs_hf_paired']:.3f}",
                         ">= 1.25" if name == "ours_hyperprompt_global" else "-",
                         ("met" if r >= 1.25 else "MISSED") if name == "ours_hyperprompt_global" else "-"])
    if "memory" in results:
        z = results["memory"]["zero_state"]["zero3_over_zero0_max"]
        rows.append(["ZeRO-3 / ZeRO-0 model+optim state per rank", f"{z:.3f}", "<= 0.55",
                     "met" if z <= 0.55 else "MISSED"])
        for mode, r in results["memory"]["activation_checkpointing"]["modes"].items():
            if mode != "none":
                rows.append([f"activation ckpt {mode}: step peak / none, time / none",
                             f"{r['step_peak_vs_none']:.3f}, {r['time_vs_none']:.3f}", "-", "-"])
    if "batching" in results:
        b = results["batching"]
        d, d1 = b["default"], b["one_rank"]["default"]
        rows.append(["batching (defaults), 8 ranks; 1 rank: real tokens, largest task share / rate",
                     f"{d['real_token_fraction']:.3f}, {d['largest_share_over_rate']:.2f}; "
                     f"{d1['real_token_fraction']:.3f}, {d1['largest_share_over_rate']:.2f}", ">= 0.90, <= 1.25",
                     "met" if b["target_met"] else "MISSED"])
    if "checkpoint_io" in results:
        for preset, r in results["checkpoint_io"]["models"].items():
            rows.append([f"checkpoint save / load s, {preset} ({r['params'] / 1e6:.1f}M)",
                         f"{r['save_s_median']:.2f} / {r['load_s_median']:.2f}", "-", "-"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runners = {
        "step_time": run_step_time,
        "conditioning_cost": lambda: conditioning_cost.run(("t5-small", "t5-base"), (1, 8), 5),
        "hf_throughput": lambda: hf_throughput.run("t5-small", 128, 32, 4, 4),
        "memory": lambda: memory.run("t5-small", 2, "t5-small", 512, 2, 3),
        "batching": run_batching,
        "checkpoint_io": lambda: checkpoint_io.run(("tiny-v1_0", "t5-small", "t5-base"), 3, 2),
    }
    results, durations = {}, {}
    print(f"machine: {machine()}\n", flush=True)
    for name in args.only:
        print(f"===== {name}", flush=True)
        start = time.perf_counter()
        results[name] = runners[name]()
        durations[name] = time.perf_counter() - start
        print(f"({name}: {durations[name]:.0f}s)\n", flush=True)
    rows = headline(results)
    print(table(["measure", "value", "target", ""], rows))
    write_json("summary", {"benchmark": "run_all", "durations_s": durations,
                           "headline": [dict(zip(("measure", "value", "target", "status"), r)) for r in rows]})


if __name__ == "__main__":
    main()
