"""Markdown tables of bench/results/*.json (what docs/benchmarks.md quotes).

    python -m bench.report [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, ratios

MIB = 2**20


def md(headers, rows) -> str:
    def fmt(c):
        if isinstance(c, float):
            return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
        return str(c)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(data: dict) -> str:
    m = data["machine"]
    return (f"_{m['utc']}, {m['cpu_model']}, {m['cpu_count']} cores, load average (1/5/15 min) at the end "
            f"{m['loadavg_1_5_15']}, torch {m['torch']}, {m['torch_threads']} thread(s)_")


def step_time(data: dict) -> str:
    out = []
    for res in data["results"]:
        rel = ratios({v: r["step_s_all"] for v, r in res["variants"].items()}, "none")
        out.append(f"**{res['preset']}**, input {res['enc_len']} / target {res['dec_len']} tokens, batch "
                   f"{res['batch']}, prompt length {res['prompt_length']}, {res['rounds']} interleaved rounds; "
                   f"fp32 matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s\n")
        out.append(md(["variant", "step s (median)", "x none (medians)", "x none (mins)", "x none (paired)",
                       "conditioning params", "model GFLOP/s", "MFU vs matmul peak", "all step times s"],
                      [[v, r["step_s_median"], rel[v]["ratio_median"], rel[v]["ratio_min"], rel[v]["ratio_paired_median"],
                        r["conditioning_params"], r["achieved_gflops"],
                        r["mfu_vs_matmul_peak"], ", ".join(f"{t:.2f}" for t in r["step_s_all"])]
                       for v, r in res["variants"].items()]))
        out.append("")
    return "\n".join(out) + "\n" + machine_line(data)


def hf(data: dict) -> str:
    rows = [[n, r["step_s_median"], r["tokens_per_s"], r["throughput_vs_hf"], r["throughput_vs_hf_min"],
             r["throughput_vs_hf_paired"], r["param_tensors"], ", ".join(f"{t:.2f}" for t in r["step_s_all"])]
            for n, r in data["models"].items()]
    return (f"{data['preset']}, input {data['enc_len']} / target {data['dec_len']}, micro-batch "
            f"{data['micro_batch_per_rank']} per rank, {data['ranks']} ranks, {data['rounds']} interleaved rounds, "
            f"HF attention `{data['hf_attn_implementation']}`, transformers {data['transformers']}, "
            f"deepspeed {data['deepspeed']}\n\n"
            + md(["model", "step s (median)", "tokens/s", "x hf_t5 (medians)", "x hf_t5 (mins)", "x hf_t5 (paired)",
                  "param tensors", "all step times s"], rows)
            + "\n\n" + machine_line(data))


def memory(data: dict) -> str:
    z = data["zero_state"]
    rows = []
    for r, rank in enumerate(z["per_rank"]):
        for stage in ("zero0", "zero3"):
            s = rank[stage]
            rows.append([r, stage, s["params"] / MIB, s["fp32_master"] / MIB, s["optimizer_state"] / MIB,
                         s["model_and_optimizer_state"] / MIB, s["gradients"] / MIB])
    a = data["activation_checkpointing"]
    ac_rows = [[m, r["step_peak_above_state_bytes"] / MIB, r["step_peak_vs_none"], r["peak_rss_bytes"] / MIB,
                r["step_s_median"], r["time_vs_none"], r["time_vs_none_paired"]] for m, r in a["modes"].items()]
    return (f"ZeRO state, {z['preset']} + {z['variant']}, {z['ranks']} ranks, {z['precision']}, {z['optimizer']}:\n\n"
            + md(["rank", "stage", "params MiB", "fp32 master MiB", "optimizer state MiB", "model+optimizer MiB",
                  "gradient buffers MiB"], rows)
            + f"\n\nZeRO-3 / ZeRO-0 (model+optimizer, per rank): {', '.join(f'{x:.3f}' for x in z['zero3_over_zero0'])}; "
            f"without DeepSpeed's duplicate fp32 master (derived): "
            f"{', '.join(f'{x:.3f}' for x in z['zero3_over_zero0_without_duplicate_master'])}\n\n"
            f"Activation checkpointing, {a['preset']} + {a['variant']}, input {a['enc_len']} / target {a['dec_len']}, "
            f"batch {a['batch']}, {a['precision']}, {a['rounds']} interleaved rounds for time:\n\n"
            + md(["mode", "step peak above state MiB", "x none", "process peak RSS MiB", "step s (median)",
                  "time x none (medians)", "time x none (paired)"],
                 ac_rows)
            + "\n\n" + machine_line(data))


def batching(data: dict) -> str:
    modes = [m for m in ("random", "length", "stratified", "packed", "default") if isinstance(data.get(m), dict)]
    return (md(["batching", "real-token fraction", "largest task share", "x its rate"],
               [[m, data[m]["real_token_fraction"], data[m]["largest_task_share"], data[m]["largest_share_over_rate"]]
                for m in modes])
            + f"\n\n{data['examples_per_task']} examples per task, global batch {data['micro_batch_size']} x "
              f"{data['ranks']} ranks, {data['batches']} batches, bucket pool {data['bucket_pool_batches']} batches, "
              + (f"default `{data['default']}`" if isinstance(data["default"], str) else "`default`: the defaults")
              + "\n\n" + machine_line(data))


def checkpoint(data: dict) -> str:
    """bench.checkpoint_io: save and resume against ``dd`` on the same disk, per preset."""
    models = data["models"]
    saves = md(["preset", "params (M)", "checkpoint MB", "save s (median)", "save GB/s", "dd write GB/s",
                "save / dd per round"],
               [[p, r["params"] / 1e6, r["checkpoint_bytes"] / 1e6, r["save_s_median"], r["save_gb_per_s"],
                 r["dd_write_gb_per_s"], ", ".join(f"{x:.2f}" for x in r["save_over_dd_per_round"])]
                for p, r in models.items()])
    resumes = md(["preset", "cache", "resume s (verify + load) per round", "resume GB/s", "dd read GB/s",
                  "resume / dd per round", f"resume / dd with {data.get('dd_streams', '-')} streams per round",
                  "load average (1 min)"],
                 [[p, cache, ", ".join(f"{x['verify_s']:.2f} + {x['load_s']:.2f}" for x in c["rounds"]),
                   c["resume_gb_per_s"], c["dd_read_gb_per_s"],
                   ", ".join(f"{x:.2f}" for x in c["resume_over_dd_per_round"]),
                   ", ".join(f"{x:.2f}" for x in c.get("resume_over_dd_n_per_round") or []) or "-",
                   f"{c['loadavg_1min'][0]:.1f}-{c['loadavg_1min'][1]:.1f}"]
                  for p, r in models.items() for cache in ("cold", "warm") if cache in r
                  for c in (r[cache],)])
    cold = "" if all(r["cold"]["cold"] for r in models.values() if "cold" in r) else \
        "\n\nThe page cache could not be dropped: the 'cold' rows are warm."
    return (f"{data['ranks']} rank(s), ZeRO-{data['zero_stage']}, {data['precision']}, {data['saves']} saves and "
            f"{data['loads']} cold + warm resume rounds, interleaved with `dd`\n\n" + saves + "\n\n" + resumes
            + cold + "\n\n" + machine_line(data))


def conditioning(data: dict) -> str:
    variants = list(data["results"][0]["variants"])
    rows = [[f"{r['preset']}, {r['distinct_tasks']} task(s)"] + [r["variants"][v]["fwd_bwd_s_median"] * 1e3 for v in variants]
            for r in data["results"]]
    return md(["fwd+bwd ms (median)"] + variants, rows) + "\n\n" + machine_line(data)


RENDER = {"conditioning_cost": conditioning, "step_time": step_time, "hf_throughput": hf, "memory": memory, "batching": batching,
          "checkpoint_io": checkpoint}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in sorted(args.results.glob("*.json")):
        data = json.loads(path.read_text())
        render = RENDER.get(data.get("benchmark"))
        if render:
            try:
                text = render(data)
            except KeyError as missing:  # a file an older version of its bench wrote
                text = f"(written by an older version of bench.{data['benchmark']}: no field {missing}; not rendered)"
            print(f"### {path.name}\n\n{text}\n")


if __name__ == "__main__":
    main()
