"""Inside one stage's subprocess of ``bench.gpu``: build each runner, time its steps side by side.

Owns: building a runner (plain PyTorch, a DeepSpeed engine of the project's config, or
transformers' T5 on it), one training step, the interleaved timing and profile of a ``train``
stage, and the ``attention`` and ``config`` stages. Does not own: the tables of stages and
runners (``gpu_stages.py``), nor starting subprocesses and reading the targets (``gpu.py``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.gpu_stages import HP, NUM_TASKS, Runner, Stage
from hp_deepspeed.compat.torch import sdpa_backend, torch_function_mode
from hp_deepspeed.launching.device import prepare_process

REPO = Path(__file__).resolve().parents[1]


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def gpu_precision(stage: Stage) -> bool:
    """Whether the stage's engines run as on a GPU: bf16 DeepSpeed engines, plain PyTorch with bf16
    autocast and fused AdamW. Always on a GPU; on the CPU only in narrow stages, where the
    arithmetic is negligible and what is measured is the host work of those very code paths
    (elsewhere the CPU stages are fp32: CPU bf16 kernels would only measure the CPU)."""
    return _device().type == "cuda" or stage.narrow


def _init_world_of_one() -> None:
    """A one-rank process group (DeepSpeed needs one): nccl on a GPU, gloo on the CPU."""
    import deepspeed

    from hp_deepspeed.testing.ranks import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if _device().type == "cuda" else "gloo")


def ds_config_for(engine: str, stage: Stage, t5_config, model_size=None) -> dict:
    """The complete DeepSpeed config of a runner, built the way the trainer builds it."""
    from hp_deepspeed.training import ds_config as dsc
    from hp_deepspeed.training.optim import OptimConfig
    from hp_deepspeed.training.train_config import TrainingConfig

    on_cpu = _device().type == "cpu"
    path = TrainingConfig().ds_config if engine == "default" else "ds_configs/zero3_bf16.json"
    base = dsc.read_ds_config(REPO / path)
    zero = base.setdefault("zero_optimization", {})
    if engine.startswith("zero"):
        zero["stage"] = int(engine[4])
    if engine == "zero3_hf_rule":
        d = t5_config.d_model
        zero.update(reduce_bucket_size=d * d, stage3_prefetch_bucket_size=int(0.9 * d * d),
                    stage3_param_persistence_threshold=10 * d)
    if not gpu_precision(stage):
        base.pop("bf16", None)  # the CPU proxy is fp32
    kwargs = dict(micro_batch_size=stage.batch, gradient_accumulation=1, world_size=1, optim=OptimConfig(),
                  d_model=t5_config.d_model, log_every=1000, on_cpu=on_cpu)
    cfg = dsc.build_ds_config(base, **kwargs, model_size=model_size)
    cfg["optimizer"]["params"]["torch_adam"] = True  # no FusedAdam JIT build inside a timed stage
    if gpu_precision(stage):
        cfg["optimizer"]["params"]["fused"] = True  # torch's fused AdamW, as the trainer's GPU default
    return cfg


def _model_size(stage: Stage, runner: Runner):
    from hp_deepspeed.training.parallelism import ModelSize

    return ModelSize.of(_model_cfg(stage, runner), _cond_cfg(runner, stage), NUM_TASKS)


@functools.lru_cache
def _narrow_preset(preset: str) -> str:
    """A folder holding ``preset``'s architecture at d_model 64 (``Stage.narrow``), written once."""
    import tempfile

    from hp_deepspeed.model.t5_config import T5Config

    config = replace(T5Config.from_pretrained(preset), d_model=64, d_ff=128, d_kv=8, vocab_size=256)
    folder = Path(tempfile.gettempdir()) / f"hp_deepspeed_narrow_{preset.replace('/', '_')}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return str(folder)


def _model_cfg(stage: Stage, runner: Runner, dtype: str = "float32"):
    from hp_deepspeed.model.builder import ModelConfig

    # On the CPU the stages only guard against rot: aot_eager traces the same graphs in seconds,
    # where inductor would spend a minute building C++ kernels for a tiny model.
    name = _narrow_preset(stage.preset) if stage.narrow else stage.preset
    return ModelConfig(name_or_path=name, load_weights=False, activation_checkpointing=stage.checkpointing,
                       dtype=dtype, compile=runner.compiled,
                       compile_backend="inductor" if _device().type == "cuda" else "aot_eager")


def _cond_cfg(runner: Runner, stage: Stage):
    from hp_deepspeed.model.conditioning import ConditioningConfig

    cfg = ConditioningConfig(variant=runner.variant, freeze_backbone=runner.freeze_backbone)
    if stage.narrow:
        # The hypernetworks' widths do not follow d_model: narrow them too, or their arithmetic
        # (about 5 GFLOP a step at the default widths) would be most of a narrow step. Two prompt
        # slots, not 16: the slots add keys (arithmetic), not operations, and 16 slots would add
        # 50% to the encoder's 32 keys and 200% to the decoder's 8 (at 512 / 128 tokens: 3%, 12%).
        cfg = replace(cfg, prompt_length=2, bottleneck=4, task_embedding_dim=4, layer_embedding_dim=4,
                      projector_hidden_dim=8, hyper_embedding_dim=4)
    return cfg


def build_runner(stage: Stage, runner: Runner):
    """(model or engine, optimizer or None, ds_config or None)."""
    import deepspeed
    import torch

    from hp_deepspeed.model.builder import resolve_t5_config
    from hp_deepspeed.model.hyperprompt_t5 import build_model
    from hp_deepspeed.training.parallelism import mark_leaf_blocks

    device = _device()
    model_cfg = _model_cfg(stage, runner)
    t5_config = resolve_t5_config(model_cfg)
    if runner.engine == "plain":
        with torch.device(device):  # allocate on the device directly: an XXL on the host is minutes
            model = build_model(model_cfg, _cond_cfg(runner, stage), NUM_TASKS, device=device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=gpu_precision(stage))
        return model, optimizer, None
    ds_config = ds_config_for(runner.engine, stage, t5_config, _model_size(stage, runner))
    zero3 = ds_config["zero_optimization"].get("stage") == 3
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    if runner.model == "hf":
        import transformers

        hf_config = transformers.T5Config(**t5_config.to_hf_dict())
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
            model = transformers.T5ForConditionalGeneration(hf_config)
    else:
        with torch.device(device if not zero3 else "cpu"):
            model = build_model(_model_cfg(stage, runner, "bfloat16" if bf16 else "float32"), _cond_cfg(runner, stage),
                                NUM_TASKS, ds_config=ds_config)
    if runner.model == "ours":  # the trainer's rule: under ZeRO-3 each T5 block is gathered with one pair of hooks
        mark_leaf_blocks(model, ds_config, enabled=runner.engine != "zero3_per_module")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    engine.train()
    return engine, None, ds_config


def make_batch(stage: Stage, vocab: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (stage.batch, stage.enc_len), generator=g)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.randint(2, vocab, (stage.batch, stage.dec_len), generator=g),
             "task_ids": torch.arange(stage.batch) % NUM_TASKS}
    return {k: v.to(device) for k, v in batch.items()}


def step_fn(runner: Runner, engine, optimizer, batch: dict, autocast_bf16: bool = False):
    """One training step of a runner, synchronised with the device so wall time is step time.
    ``autocast_bf16``: plain PyTorch's mixed precision (``gpu_precision``)."""
    import torch

    device = _device()
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if runner.model == "ours" and runner.variant != "none":
        kwargs["task_ids"] = batch["task_ids"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=optimizer is not None and autocast_bf16)

    def step():
        with autocast:
            loss = engine(**kwargs).loss
        if optimizer is None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def _optimizer_name(engine, optimizer) -> str:
    """What updates the weights: torch's AdamW (and whether fused) for plain PyTorch, DeepSpeed's
    wrapper class for an engine (BF16_Optimizer, DeepSpeedZeroOptimizer, ..._Stage3)."""
    if optimizer is not None:
        return f"{type(optimizer).__name__}(fused={bool(optimizer.defaults.get('fused'))})"
    return type(engine.optimizer).__name__


def run_train_stage(stage: Stage) -> dict:
    import torch

    from bench.common import interleave, median, ratios
    from hp_deepspeed.model.builder import resolve_t5_config
    from hp_deepspeed.training.flops import device_peak_tflops, shape_of, train_step_flops

    _init_world_of_one()
    device = _device()
    t5_config = resolve_t5_config(_model_cfg(stage, stage.runners[0]))
    batch = make_batch(stage, t5_config.vocab_size, device)
    steps, rows = {}, {}
    for runner in stage.runners:
        engine, optimizer, ds_config = build_runner(stage, runner)
        # The F.linear in effect once the runner is built: torch's unless DeepSpeed replaced it
        # for the whole process (``memory_efficient_linear``, which the project turns off).
        linear = torch.nn.functional.linear
        steps[runner.name] = step_fn(runner, engine, optimizer, batch, gpu_precision(stage))
        rows[runner.name] = {**asdict(runner), "flops": train_step_flops(
            shape_of(t5_config), stage.batch, stage.enc_len, stage.dec_len, _cond_cfg(runner, stage).kv_prompt_length),
            "zero_optimization": None if ds_config is None else ds_config["zero_optimization"],
            "linear": f"{linear.__module__}.{linear.__qualname__}",
            "bf16": bool(ds_config.get("bf16", {}).get("enabled")) if ds_config else gpu_precision(stage),
            "optimizer": _optimizer_name(engine, optimizer)}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    times = interleave({name: _cpu_timed(step, cpu[name]) for name, step in steps.items()},
                       rounds=stage.rounds, warmup=stage.warmup)
    first = stage.runners[0].name
    rel = ratios(times, first)
    peak = device_peak_tflops()
    tokens = stage.batch * (stage.enc_len + stage.dec_len)
    for name, ts in times.items():
        med = median(ts)
        rows[name].update(step_s_median=med, step_s_all=ts, tokens_per_s=tokens / med,
                          achieved_tflops=rows[name]["flops"] / med / 1e12,
                          mfu=None if peak is None else rows[name]["flops"] / med / 1e12 / peak,
                          ratio_to_first=rel[name]["ratio_median"], ratio_to_first_paired=rel[name]["ratio_paired_median"],
                          cpu_s_median=median(cpu[name][stage.warmup:]), cpu_s_all=cpu[name][stage.warmup:],
                          cpu_ratio_to_first=median(cpu[name][stage.warmup:]) / median(cpu[first][stage.warmup:]))
    if stage.profile:
        for name, step in steps.items():
            rows[name].update(profile_step(step))
    memory = None
    if device.type == "cuda":
        memory = {"peak_allocated_gib_all_engines": torch.cuda.max_memory_allocated() / 2**30}
    return {"runners": rows, "peak_tflops": peak, "memory": memory, "torch_threads": torch.get_num_threads()}


def profile_step(step, top: int = 20) -> dict[str, list[dict]]:
    """One step under torch.profiler: the operators with the most self time on the host, and on
    a GPU also those with the most device time (where the MFU goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()

    def rows(key) -> list[dict]:
        return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "cpu_total_ms": e.cpu_time_total / 1e3,
                 "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3}
                for e in sorted(events, key=key, reverse=True)[:top]]

    tops = {"profile_top": rows(lambda e: e.self_cpu_time_total)}
    if cuda:
        tops["profile_top_device"] = rows(lambda e: getattr(e, "self_device_time_total", 0))
    return tops


def _cpu_timed(step, sink: list[float]):
    """``step`` that also records its process CPU time: on a CPU shared with other jobs the host
    work a step does is far steadier than its wall time (waiting for a core is not counted)."""
    def timed_step():
        start = time.process_time()
        step()
        sink.append(time.process_time() - start)
    return timed_step


def run_attention_stage(stage: Stage) -> dict:
    """Which SDPA kernel our T5 attention gets, and in which dtype its bias arrives."""
    import torch

    from hp_deepspeed.model.builder import resolve_t5_config
    from hp_deepspeed.model.hyperprompt_t5 import build_model

    device = _device()
    results = {}
    runner = Runner("hp_global", "plain", variant=HP)
    t5_config = resolve_t5_config(_model_cfg(stage, runner))
    batch = make_batch(stage, t5_config.vocab_size, device)
    dtypes = ("bfloat16",) if device.type == "cuda" else ("float32", "bfloat16")
    for dtype in dtypes:  # bf16 weights: what ZeRO-3 bf16 runs
        with torch.device(device):
            model = build_model(_model_cfg(stage, runner, dtype), _cond_cfg(runner, stage), NUM_TASKS,
                                device=device).train()
        with AttentionCalls() as calls:
            model(**batch).loss.backward()
        results[f"{dtype}_weights"] = _distinct(calls.seen)
        del model
    return {"calls": results}


class AttentionCalls(torch_function_mode()):
    """Records each ``F.scaled_dot_product_attention`` call made inside it: shapes, dtypes, scale,
    and the kernel torch picks for it (``compat.torch.sdpa_backend``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch.nn.functional as F

        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen.append(_attention_call(*args, **kwargs))
        return func(*args, **kwargs)


def _attention_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_) -> dict:
    return {"q": list(query.shape), "k": list(key.shape), "q_dtype": str(query.dtype),
            "bias_dtype": None if attn_mask is None else str(attn_mask.dtype),
            "bias_shape": None if attn_mask is None else list(attn_mask.shape),
            "backend": sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, scale), "scale": scale}


def _distinct(calls: list[dict]) -> list[dict]:
    out = []
    for call in calls:
        if call not in out:
            out.append(call)
    return out


def run_config_stage(stage: Stage) -> dict:
    """What the default configuration chooses per model and GPU count on this machine's GPU."""
    import torch

    from hp_deepspeed.training import parallelism

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    rows = []
    for preset, freeze in (("t5-large", False), ("google/t5-v1_1-xl", False), ("google/t5-v1_1-xxl", False),
                           ("google/t5-v1_1-xxl", True)):
        runner = Runner("x", "default", variant=HP, freeze_backbone=freeze)
        size = parallelism.ModelSize.of(_model_cfg(replace(stage, preset=preset), runner), _cond_cfg(runner, stage),
                                        NUM_TASKS)
        for gpus in (1, 8, 64):
            choice = parallelism.choose_zero(size, parallelism.Hardware(world_size=gpus, gpu_mem_gib=gpu_gib))
            rows.append({"preset": preset, "freeze_backbone": freeze, "gpus": gpus, "gpu_mem_gib": round(gpu_gib, 1),
                         **choice})
    return {"choices": rows}


def run_stage(stage: Stage) -> dict:
    start = time.perf_counter()
    prepare_process()  # the trainer's process preparation (accelerator, TORCH_CUDA_ARCH_LIST, ninja)
    body = {"train": run_train_stage, "attention": run_attention_stage, "config": run_config_stage}[stage.kind]
    result = body(stage)
    return {"stage": asdict(stage), "device": _device_name(), "wall_s": time.perf_counter() - start, **result}


def _device_name() -> str:
    import torch

    from bench.common import cpu_model

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_model()}"
