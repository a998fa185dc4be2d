"""Memory: per-rank model + optimizer state at ZeRO-3 against ZeRO-0, and activation checkpointing.

    python -m bench.memory [--preset t5-small] [--ac-preset t5-small] [--ac-seq-len 512]
                           [--ac-batch 4] [--ac-rounds 3] [--out PATH]

Part 1, ZeRO state (``--ranks`` gloo ranks, fp32, HyperPrompt-Global on ``--preset``, random
init): every rank builds a ZeRO-0 engine (``ds_configs/zero0_cpu_test.json``) and a ZeRO-3
engine (``ds_configs/zero3_cpu_test.json``), both with torch AdamW via ``build_ds_config``,
takes one training step on each (so Adam's moments exist), and sums the bytes of the *distinct
storages* behind: the parameters (``param.ds_tensor`` at ZeRO-3, the full tensors at ZeRO-0),
the fp32 master weights (ZeRO-3's ``fp32_partitioned_groups_flat``), the optimizer state
tensors, and (after backward) the gradient buffers. In fp32 DeepSpeed means the master to alias
the parameter partitions, but in 0.19.8 its check ``tensor.device == self.device`` compares a
``torch.device`` with the string ``'cpu'``, which is never equal, so it keeps a second copy: the
JSON also gives the ratio without that copy (derived from the measured components).
Storages are de-duplicated by address, so views and aliases are counted once.

Part 2, activation checkpointing (single process, fp32, HyperPrompt-Global on ``--ac-preset``,
input length ``--ac-seq-len``, target length 32): peak memory of a training step per mode
(``none``, ``reentrant``, ``non_reentrant``), each in a fresh subprocess run with
``MALLOC_MMAP_THRESHOLD_=65536`` (large buffers come from mmap and return to the OS when freed,
so resident memory follows the live tensors). After a warm-up step the process resets its peak
RSS (``echo 5 > /proc/self/clear_refs``), records VmRSS, takes one step and reads VmHWM: the
step's peak above the resident model, gradients and optimizer state. Step time of the three
modes is measured in one process, interleaved (``T5Model.set_activation_checkpointing``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import interleave, median, ratios, table, write_json

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8
MODES = ("none", "reentrant", "non_reentrant")


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _state_bytes(engine, stage: int) -> dict:
    seen: set = set()
    params = list(engine.module.parameters())
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    out = {}
    if stage == 3:
        out["params"] = _storage_bytes([p.ds_tensor for p in params], seen)
        out["fp32_master"] = _storage_bytes(getattr(opt, "fp32_partitioned_groups_flat", []), seen)
    else:
        out["params"] = _storage_bytes(params, seen)
        out["fp32_master"] = 0
    out["optimizer_state"] = _storage_bytes(
        [v for state in base.state.values() for v in state.values() if isinstance(v, torch.Tensor)], seen)
    out["model_and_optimizer_state"] = out["params"] + out["fp32_master"] + out["optimizer_state"]
    out["param_count"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    return out


def zero_rank_body(preset: str, batch: int, enc_len: int, dec_len: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    from hp_deepspeed.model.builder import ModelConfig, resolve_t5_config
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
    from hp_deepspeed.training.optim import OptimConfig

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    model_cfg = ModelConfig(name_or_path=preset, load_weights=False)
    t5_config = resolve_t5_config(model_cfg)
    g = torch.Generator().manual_seed(dist.get_rank())
    input_ids = torch.randint(2, t5_config.vocab_size, (batch, enc_len), generator=g)
    labels = torch.randint(2, t5_config.vocab_size, (batch, dec_len), generator=g)
    task_ids = torch.arange(batch) % NUM_TASKS
    result = {}
    for stage, file in ((0, "zero0_cpu_test.json"), (3, "zero3_cpu_test.json")):
        ds_config = build_ds_config(
            read_ds_config(REPO / "ds_configs" / file), micro_batch_size=batch, gradient_accumulation=1,
            world_size=world, optim=OptimConfig(), d_model=t5_config.d_model, log_every=1000, on_cpu=True)
        model = build_model(model_cfg, ConditioningConfig(variant="hyperprompt_global"), NUM_TASKS, ds_config=ds_config)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
        engine.train()
        loss = engine(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                      task_ids=task_ids).loss
        engine.backward(loss)
        # Gradient buffers after backward (ZeRO-0 frees them at the step; ZeRO-3 keeps a flat buffer).
        grads = ([getattr(engine.optimizer, "grad_partitions_flat_buffer", None)] if stage == 3
                 else [p.grad for p in engine.module.parameters()])
        grad_bytes = _storage_bytes(grads, set())
        engine.step()
        result[f"zero{stage}"] = {**_state_bytes(engine, stage), "gradients": grad_bytes}
        del engine, model
        gc.collect()
    return result


def zero_state(preset: str = "t5-small", ranks: int = 2, timeout: float = 900) -> dict:
    from hp_deepspeed.testing.ranks import run_ranks

    per_rank = run_ranks("bench.memory:zero_rank_body", ranks, timeout=timeout, args=(preset, 2, 64, 16))
    ratios = [r["zero3"]["model_and_optimizer_state"] / r["zero0"]["model_and_optimizer_state"] for r in per_rank]
    # Derived, not measured: the ratio if ZeRO-3 aliased its fp32 master to the fp32 parameter
    # partitions, as DeepSpeed intends (its check compares torch.device to the string 'cpu').
    aliased = [(r["zero3"]["model_and_optimizer_state"] - r["zero3"]["fp32_master"])
               / r["zero0"]["model_and_optimizer_state"] for r in per_rank]
    return {"preset": preset, "ranks": ranks, "variant": "hyperprompt_global", "precision": "fp32",
            "optimizer": "torch AdamW", "per_rank": per_rank, "zero3_over_zero0": ratios,
            "zero3_over_zero0_without_duplicate_master": aliased,
            "zero3_over_zero0_max": max(ratios), "target": "<= 0.55", "target_met": max(ratios) <= 0.55}


# ------------------------------------------------------------------ activation checkpointing

def _build_single(preset: str, mode: str):
    from hp_deepspeed.model.builder import ModelConfig
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name_or_path=preset, load_weights=False, activation_checkpointing=mode),
                        ConditioningConfig(variant="hyperprompt_global"), NUM_TASKS).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _batch(vocab: int, batch: int, enc_len: int, dec_len: int) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (batch, enc_len), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.randint(2, vocab, (batch, dec_len), generator=g),
            "task_ids": torch.arange(batch) % NUM_TASKS}


def _train_step(model, optimizer, data) -> None:
    model(**data).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_child(preset: str, mode: str, batch: int, enc_len: int, dec_len: int) -> dict:
    """In a fresh process: the peak RSS of one training step above the resident state (bytes)."""
    torch.set_num_threads(1)
    model, optimizer = _build_single(preset, mode)
    data = _batch(model.config.vocab_size, batch, enc_len, dec_len)
    _train_step(model, optimizer, data)  # optimizer state now exists
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    _train_step(model, optimizer, data)
    peak = _status_kib("VmHWM")
    return {"mode": mode, "rss_before_step_bytes": before * 1024, "peak_rss_bytes": peak * 1024,
            "step_peak_above_state_bytes": (peak - before) * 1024}


def activation_checkpointing(preset: str = "t5-small", enc_len: int = 512, dec_len: int = 32, batch: int = 4,
                             rounds: int = 3, timeout: float = 900) -> dict:
    memory = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    for mode in MODES:
        code = ("import json, bench.memory as m; "
                f"print('RESULT', json.dumps(m.peak_child({preset!r}, {mode!r}, {batch}, {enc_len}, {dec_len})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=timeout)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"peak_child {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        memory[mode] = json.loads(lines[-1][len("RESULT "):])

    model, optimizer = _build_single(preset, "none")
    data = _batch(model.config.vocab_size, batch, enc_len, dec_len)

    def step_in(mode):
        def step():
            model.backbone.set_activation_checkpointing(mode)
            _train_step(model, optimizer, data)
        return step

    times = interleave({m: step_in(m) for m in MODES}, rounds=rounds, warmup=1)
    rel = ratios(times, "none")
    base_m = memory["none"]["step_peak_above_state_bytes"]
    rows = {m: {**memory[m], "step_s_median": median(times[m]), "step_s_all": times[m],
                "time_vs_none": rel[m]["ratio_median"], "time_vs_none_paired": rel[m]["ratio_paired_median"],
                "step_peak_vs_none": memory[m]["step_peak_above_state_bytes"] / base_m} for m in MODES}
    return {"preset": preset, "variant": "hyperprompt_global", "enc_len": enc_len, "dec_len": dec_len,
            "batch": batch, "rounds": rounds, "precision": "fp32", "modes": rows}


def run(preset="t5-small", ranks=2, ac_preset="t5-small", ac_seq_len=512, ac_batch=4, ac_rounds=3,
        out="memory") -> dict:
    zero = zero_state(preset, ranks)
    mib = 2**20
    rows = []
    for r, rank in enumerate(zero["per_rank"]):
        for stage in ("zero0", "zero3"):
            s = rank[stage]
            rows.append([f"rank {r}", stage, s["params"] / mib, s["fp32_master"] / mib, s["optimizer_state"] / mib,
                         s["model_and_optimizer_state"] / mib, s["gradients"] / mib])
    print(table(["rank", "stage", "params MiB", "fp32 master MiB", "optim state MiB", "model+optim MiB",
                 "grad buffers MiB"], rows))
    print(f"ZeRO-3 / ZeRO-0 model+optimizer state per rank: "
          f"{', '.join(f'{x:.3f}' for x in zero['zero3_over_zero0'])} (target <= 0.55); without DeepSpeed's "
          f"duplicate fp32 master: {', '.join(f'{x:.3f}' for x in zero['zero3_over_zero0_without_duplicate_master'])}\n")
    ac = activation_checkpointing(ac_preset, ac_seq_len, 32, ac_batch, ac_rounds)
    print(table(["mode", "step peak above state MiB", "x none", "peak RSS MiB", "step s (median)", "time x none",
                 "time x none (paired)"],
                [[m, r["step_peak_above_state_bytes"] / mib, r["step_peak_vs_none"], r["peak_rss_bytes"] / mib,
                  r["step_s_median"], r["time_vs_none"], r["time_vs_none_paired"]] for m, r in ac["modes"].items()]))
    result = {"benchmark": "memory", "zero_state": zero, "activation_checkpointing": ac}
    write_json(out, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ac-preset", default="t5-small")
    parser.add_argument("--ac-seq-len", type=int, default=512)
    parser.add_argument("--ac-batch", type=int, default=4)
    parser.add_argument("--ac-rounds", type=int, default=3)
    parser.add_argument("--out", default="memory")
    args = parser.parse_args(argv)
    run(args.preset, args.ranks, args.ac_preset, args.ac_seq_len, args.ac_batch, args.ac_rounds, args.out)


if __name__ == "__main__":
    main()
