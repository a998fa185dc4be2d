"""One command for the GPU speed table (issue 13), and its CPU proxy.

    python -m bench.gpu [--out DIR] [--tiny | --full] [--stages NAME ...] [--budget-s 480]

Runs every stage below in its own subprocess (``python -m bench.gpu --stage NAME``) under its own
timeout, most important first, and writes one JSON file per stage plus ``summary.json`` to
``--out`` (default ``$OUT``, else bench/results/gpu). A stage that fails or times out writes its
error and the output tail instead, and the next stage still runs. Inside a stage the engines take
turns, one training step each (A B C A B C ..., the order rotated every round), after untimed
warm-up steps (ZeRO-3's second step is slow on a GPU: it allocates its buffers), so every ratio
compares steps measured side by side in one process.

On a GPU (``--full``, the default there) the shapes are the issue's: bf16, 512 input / 128 target
tokens, t5-large batch 16, t5-v1_1-xl batch 16 (full fine-tune), t5-v1_1-xxl batch 8 (frozen
backbone), activation checkpointing for the last two. On the CPU (``--tiny``, the default there)
the same stages run with the tiny presets and a few tokens, fp32 (the ``host`` stage in bf16, as
on a GPU), so the script cannot rot; the
``proxy`` stage is the host-overhead proxy of the issue (t5-small shape, batch 4, 64 -> 16
tokens, fp32: ZeRO-3 at world size 1 over plain PyTorch, and transformers' T5 on the same engine),
and the ``host`` stage the same engines at t5-large's depth with a negligible width (d_model 64):
there a step is almost only host time -- Python, the dispatcher, ZeRO-3's module hooks -- which
is what bounds a GPU step when kernels are launched faster than they finish. It keeps the GPU's
precision on the CPU too (``gpu_precision``), so its engines run the GPU's code paths: plain
PyTorch with bf16 autocast and fused AdamW, DeepSpeed's BF16_Optimizer for stage 0 (which the
project's fp32 gradient accumulation makes stage 1), its bf16 ZeRO-2 and ZeRO-3.
Every step's wall time and process CPU time are recorded; on a CPU shared with other jobs the CPU
time is the steadier measure of the host work (run the proxy with ``OMP_NUM_THREADS=1`` so that
idle OpenMP threads spinning do not count).

Engines ("runners"):

* ``plain``: our model, ``torch.optim.AdamW`` (fused), fp32 weights, bf16 autocast (on the CPU
  fp32 and unfused, except in the ``host`` stage) -- the reference every DeepSpeed figure is
  compared with;
* ``default``: the project's default ``training.ds_config`` through ``build_ds_config``, i.e. the
  configuration a user gets (ZeRO stage and sizes chosen by ``training/parallelism.py``);
* ``zero0`` / ``zero2`` / ``zero3``: that stage forced (``ds_configs/zero3_bf16.json`` with the
  stage replaced; its "auto" sizes resolved by the project; under ZeRO-3 our T5 blocks are leaf
  modules, ``training.zero3_leaf_blocks``, as in the trainer);
* ``zero3_per_module``: ``zero3`` without leaf blocks (DeepSpeed's hooks on every submodule);
* ``zero3_hf_rule``: ZeRO-3 with the sizes of the Hugging Face rule (buckets d_model^2,
  persistence 10 d_model) that the project used before issue 13;
* ``hf``: transformers' ``T5ForConditionalGeneration`` under the ``zero3`` config.

DeepSpeed engines use torch's AdamW (``torch_adam``) so that no FusedAdam JIT build is timed.
MFU is model FLOPs (``training/flops.py``) per second over the card's bf16 peak
(``flops.device_peak_tflops``); on the CPU only achieved GFLOP/s are given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hp_deepspeed.testing.distributed import DistributedTestError, run_command

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 8


# ---------------------------------------------------------------------------------------------
# What runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runner:
    """One engine of a stage."""

    name: str
    engine: str
    """``plain``, ``default``, ``zero0``, ``zero2``, ``zero3``, ``zero3_per_module`` or ``zero3_hf_rule``."""
    model: str = "ours"
    """``ours`` (hyperprompt_t5.build_model) or ``hf`` (transformers' T5ForConditionalGeneration)."""
    variant: str = "none"
    """Conditioning variant of our model."""
    freeze_backbone: bool = False
    """Train only the conditioning (conditioning.freeze_backbone)."""
    compiled: bool = False
    """torch.compile'd T5 blocks (model.compile); compiled during the warm-up steps."""


@dataclass(frozen=True)
class Stage:
    """One subprocess: a model shape and the engines that take turns on it."""

    name: str
    preset: str
    batch: int
    enc_len: int
    dec_len: int
    runners: tuple[Runner, ...]
    timeout_s: int
    checkpointing: str = "none"
    """model.activation_checkpointing of every runner."""
    warmup: int = 2
    rounds: int = 5
    kind: str = "train"
    """``train`` (time steps), ``attention`` (which SDPA kernel) or ``config`` (the default's choices)."""
    profile: bool = False
    """After timing, one more step of each runner under torch.profiler (top operators in the JSON)."""
    narrow: bool = False
    """The preset's depth and layout at d_model 64 (d_ff 128, d_kv 8, vocabulary 256; the
    hypernetworks' widths 4 to 8, 2 prompt slots): compute becomes negligible and a step measures
    the host's work."""


HP = "hyperprompt_global"
# Where each engine's host time goes: t5-large's depth at a negligible width (a step is host
# time). Last on a GPU; in --proxy mode on the CPU beside the proxy.
HOST = Stage("host", "t5-large", 4, 32, 8, (
    Runner("plain_none", "plain"), Runner("plain_hp_global", "plain", variant=HP),
    Runner("zero0_none", "zero0"), Runner("zero0_hp_global", "zero0", variant=HP), Runner("zero2_none", "zero2"),
    Runner("zero3_none", "zero3"), Runner("zero3_per_module_none", "zero3_per_module"),
    Runner("zero3_hf", "zero3", model="hf")), 120, narrow=True, rounds=7)
FULL_STAGES = (
    Stage("attention", "t5-large", 16, 512, 128, (), 90, kind="attention"),
    Stage("default_config", "t5-large", 16, 512, 128, (), 90, kind="config"),
    # Targets 1 and 6: the default configuration with HyperPrompt-Global, its cost over no
    # conditioning, and plain PyTorch beside them.
    # model.compile beside them: whether compiled blocks are the lever the MFU target needs.
    Stage("large_default", "t5-large", 16, 512, 128, (
        Runner("default_hp_global", "default", variant=HP), Runner("default_none", "default"),
        Runner("plain_none", "plain"), Runner("default_hp_global_compiled", "default", variant=HP, compiled=True)),
        240, profile=True),
    # Target 5: ZeRO-3 forced, ours against transformers' T5 on the same engine; and the sizes
    # of the Hugging Face rule the project used before issue 13.
    Stage("large_zero3", "t5-large", 16, 512, 128, (
        Runner("zero3_none", "zero3"), Runner("zero3_hp_global", "zero3", variant=HP),
        Runner("zero3_hf", "zero3", model="hf"), Runner("zero3_hf_rule_none", "zero3_hf_rule")), 240, profile=True),
    Stage("xl_full", "google/t5-v1_1-xl", 16, 512, 128, (Runner("default_hp_global", "default", variant=HP),),
          150, checkpointing="non_reentrant", rounds=4),
    Stage("xxl_frozen", "google/t5-v1_1-xxl", 8, 512, 128,
          (Runner("default_hp_global", "default", variant=HP, freeze_backbone=True),),
          180, checkpointing="non_reentrant", rounds=3),
    # Target 4: ZeRO-3 forced beside the single-GPU stages, and without leaf blocks.
    Stage("large_stages", "t5-large", 16, 512, 128, (
        Runner("zero0_none", "zero0"), Runner("zero2_none", "zero2"),
        Runner("zero3_none", "zero3"), Runner("zero3_per_module_none", "zero3_per_module")), 150),
    HOST,
)
# The host-overhead proxy (CPU): measured before issue 13 at 1.67x (ours) and 1.60x (hf).
PROXY = Stage("proxy", "t5-small", 4, 64, 16, (
    Runner("plain_none", "plain"), Runner("zero3_none", "zero3"), Runner("zero3_hf", "zero3", model="hf")),
    900, warmup=1, rounds=7, profile=True)


def tiny(stage: Stage) -> Stage:
    """The same stage at CPU-test size: tiny presets, a few tokens, two rounds."""
    preset = "tiny-v1_1" if "v1_1" in stage.preset else "tiny-v1_0"
    return replace(stage, preset=preset, batch=2, enc_len=12, dec_len=5, warmup=1, rounds=2, timeout_s=240)


def stages_for(mode: str) -> tuple[Stage, ...]:
    if mode == "full":
        return FULL_STAGES
    if mode == "proxy":
        return (replace(HOST, timeout_s=600), PROXY)
    return tuple(tiny(s) for s in FULL_STAGES)


# ---------------------------------------------------------------------------------------------
# Inside a stage's subprocess
# ---------------------------------------------------------------------------------------------
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

    from hp_deepspeed.testing.distributed import free_port

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
    if model_size is not None and "model_size" in dsc.build_ds_config.__code__.co_varnames:
        kwargs["model_size"] = model_size  # the project's choice needs the model (after issue 13)
    cfg = dsc.build_ds_config(base, **kwargs)
    cfg["optimizer"]["params"]["torch_adam"] = True  # no FusedAdam JIT build inside a timed stage
    if gpu_precision(stage):
        cfg["optimizer"]["params"]["fused"] = True  # torch's fused AdamW, as the trainer's GPU default
    return cfg


def _model_size(stage: Stage, runner: Runner):
    try:
        from hp_deepspeed.training.parallelism import ModelSize
    except ImportError:  # the tree before issue 13 (the "before" proxy run)
        return None
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
    """(model or engine, optimizer or None, ds_config or None, the runner's F.linear).

    ``deepspeed.zero.Init`` with ``memory_efficient_linear`` (DeepSpeed's default) replaces
    ``torch.nn.functional.linear`` for the whole process, so every runner built after a ZeRO-3
    one would run DeepSpeed's Python linear too. Each runner's own ``F.linear`` is returned and
    the original put back; ``step_fn`` installs the runner's for its steps."""
    import torch

    original = torch.nn.functional.linear
    try:
        built = _build_runner(stage, runner)
        return (*built, torch.nn.functional.linear)
    finally:
        torch.nn.functional.linear = original


def _build_runner(stage: Stage, runner: Runner):
    import deepspeed
    import torch

    from hp_deepspeed.model.builder import resolve_t5_config
    from hp_deepspeed.model.hyperprompt_t5 import build_model

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
    if runner.model == "ours":
        try:  # the trainer's rule: under ZeRO-3 each T5 block is gathered with one pair of hooks
            from hp_deepspeed.training.parallelism import mark_leaf_blocks
        except ImportError:  # the tree before leaf blocks (the "before" proxy run)
            mark_leaf_blocks = None
        if mark_leaf_blocks is not None:
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


def step_fn(runner: Runner, engine, optimizer, batch: dict, linear=None, autocast_bf16: bool = False):
    """One training step of a runner, synchronised with the device so wall time is step time.
    ``autocast_bf16``: plain PyTorch's mixed precision (``gpu_precision``)."""
    import torch

    device = _device()
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if runner.model == "ours" and runner.variant != "none":
        kwargs["task_ids"] = batch["task_ids"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=optimizer is not None and autocast_bf16)

    def step():
        if linear is not None:
            torch.nn.functional.linear = linear  # this runner's (see build_runner)
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
        engine, optimizer, ds_config, linear = build_runner(stage, runner)
        steps[runner.name] = step_fn(runner, engine, optimizer, batch, linear, gpu_precision(stage))
        rows[runner.name] = {**asdict(runner), "flops": train_step_flops(
            shape_of(t5_config), stage.batch, stage.enc_len, stage.dec_len, _cond_cfg(runner, stage).kv_prompt_length),
            "zero_optimization": None if ds_config is None else ds_config["zero_optimization"],
            "linear": f"{linear.__module__}.{linear.__qualname__}",  # torch's, or DeepSpeed's replacement
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
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from hp_deepspeed.model.builder import resolve_t5_config
    from hp_deepspeed.model.hyperprompt_t5 import build_model

    device = _device()
    seen: list[dict] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
        seen.append({"q": list(query.shape), "k": list(key.shape), "q_dtype": str(query.dtype),
                     "bias_dtype": None if attn_mask is None else str(attn_mask.dtype),
                     "bias_shape": None if attn_mask is None else list(attn_mask.shape),
                     "backend": SDPBackend(choice).name, "scale": scale})
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = spy
    results = {}
    runner = Runner("hp_global", "plain", variant=HP)
    t5_config = resolve_t5_config(_model_cfg(stage, runner))
    batch = make_batch(stage, t5_config.vocab_size, device)
    dtypes = ("bfloat16",) if device.type == "cuda" else ("float32", "bfloat16")
    for dtype in dtypes:  # bf16 weights: what ZeRO-3 bf16 runs
        with torch.device(device):
            model = build_model(_model_cfg(stage, runner, dtype), _cond_cfg(runner, stage), NUM_TASKS,
                                device=device).train()
        seen.clear()
        model(**batch).loss.backward()
        results[f"{dtype}_weights"] = _distinct(seen)
        del model
    F.scaled_dot_product_attention = sdpa
    return {"calls": results}


def _distinct(calls: list[dict]) -> list[dict]:
    out = []
    for call in calls:
        if call not in out:
            out.append(call)
    return out


def run_config_stage(stage: Stage) -> dict:
    """What the default configuration chooses per model and GPU count on this machine's GPU."""
    import torch

    try:
        from hp_deepspeed.training import parallelism
    except ImportError:
        return {"error": "hp_deepspeed.training.parallelism is missing (tree before issue 13)"}
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
    try:  # the trainer's process preparation (accelerator, TORCH_CUDA_ARCH_LIST, ninja)
        from hp_deepspeed.launching.device import prepare_process
    except ImportError:  # the tree before issue 12 (the "before" proxy run)
        prepare_process = None
    if prepare_process is not None:
        prepare_process()
    body = {"train": run_train_stage, "attention": run_attention_stage, "config": run_config_stage}[stage.kind]
    result = body(stage)
    return {"stage": asdict(stage), "device": _device_name(), "wall_s": time.perf_counter() - start, **result}


def _device_name() -> str:
    import torch

    from bench.common import cpu_model

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_model()}"


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def run_in_subprocess(stage: Stage, mode: str, out: Path, timeout_s: float) -> dict:
    """Run one stage in a fresh process; its JSON, or the failure with the output's tail."""
    path = out / f"{stage.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu", "--stage", stage.name, "--mode", mode, "--out", str(out)]
    # Its own session, killed as a group on timeout: a JIT build (ninja) must not outlive it.
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    start = time.perf_counter()
    try:
        done = run_command(cmd, timeout=timeout_s, env=threads, cwd=REPO, check=False)
        rc, tail = done.returncode, done.output
    except DistributedTestError as err:  # the timeout
        rc, tail = "timeout", str(err)
    (out / f"{stage.name}.log").write_text(tail)
    if rc == 0 and path.is_file():
        return json.loads(path.read_text())
    result = {"stage": asdict(stage), "error": f"exit {rc} after {time.perf_counter() - start:.0f}s (limit {timeout_s:.0f}s)",
              "output_tail": tail[-4000:]}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# The targets, each read from runners measured side by side in one stage:
# (target, stage, how to measure, goal). A ratio is step time over step time.
TARGETS = (
    ("t5-large b16 MFU, default config, HyperPrompt-Global", "large_default", ("mfu", "default_hp_global"), (">=", 0.40)),
    ("t5-v1_1-xl b16 MFU, full fine-tune", "xl_full", ("mfu", "default_hp_global"), (">=", 0.40)),
    ("t5-v1_1-xxl b8 MFU, frozen backbone", "xxl_frozen", ("mfu", "default_hp_global"), (">=", 0.35)),
    ("ZeRO-3 forced / best of ZeRO-0 and ZeRO-2, step time", "large_stages", ("ratio", "zero3_none", ("zero0_none", "zero2_none")), ("<=", 1.25)),
    ("transformers' T5 / ours under the same ZeRO-3, step time", "large_zero3", ("ratio", "zero3_hf", ("zero3_none",)), (">=", 2.0)),
    ("HyperPrompt-Global / no conditioning, default config, step time", "large_default", ("ratio", "default_hp_global", ("default_none",)), ("<=", 1.03)),
)


def target_rows(results: list[dict]) -> list[dict]:
    """Each target with its measured value, or why it has none (stage not run, failed, no peak)."""
    by_stage = {res["stage"]["name"]: res for res in results}
    rows = []
    for name, stage, (kind, runner, *rest), (op, goal) in TARGETS:
        res, value, why = by_stage.get(stage), None, None
        runners = (res or {}).get("runners", {})
        if res is None or "error" in res:
            why = "stage not run" if res is None else res["error"]
        elif kind == "mfu":
            value = runners[runner]["mfu"]
            why = "no known peak for this device" if value is None else None
        else:
            value = runners[runner]["step_s_median"] / min(runners[r]["step_s_median"] for r in rest[0])
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        rows.append({"target": name, "stage": stage, "value": value, "goal": f"{op} {goal:g}", "met": met, "why": why})
    return rows


def summary_rows(results: list[dict]) -> list[list]:
    rows = []
    for res in results:
        if "error" in res:
            rows.append([res["stage"]["name"], "-", res["error"], "", "", "", "", "", ""])
        for name, r in res.get("runners", {}).items():
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            stage_cfg = (r["zero_optimization"] or {}).get("stage", "plain")
            rows.append([res["stage"]["name"], name, f"ZeRO-{stage_cfg}" if stage_cfg != "plain" else "plain",
                         r["step_s_median"], r["tokens_per_s"], mfu, r["ratio_to_first"], r["cpu_s_median"],
                         r["cpu_ratio_to_first"]])
    return rows


def drive(mode: str, out: Path, names: list[str] | None, budget_s: float) -> list[dict]:
    from bench.common import machine, table

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    results = []
    for stage in stages_for(mode):
        if names and stage.name not in names:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            results.append({"stage": asdict(stage), "error": "skipped: the time budget is spent"})
            continue
        print(f"== {stage.name} ({stage.preset}, batch {stage.batch}, {stage.enc_len}->{stage.dec_len})", flush=True)
        results.append(run_in_subprocess(stage, mode, out, min(stage.timeout_s, left)))
    print(table(["stage", "runner", "engine", "step s", "tokens/s", "MFU", "x first", "CPU s", "CPU x first"],
                summary_rows(results)))
    targets = target_rows(results)
    print(table(["target", "measured", "goal", "verdict"], [
        [t["target"], "-" if t["value"] is None else f"{t['value']:.3g}", t["goal"],
         t["why"] if t["met"] is None else ("met" if t["met"] else "MISSED")] for t in targets]))
    summary = {"benchmark": "gpu", "mode": mode, "machine": machine(), "targets": targets, "stages": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json")
    return results


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="CPU-size shapes")
    group.add_argument("--full", dest="mode", action="store_const", const="full", help="the issue's GPU shapes")
    group.add_argument("--proxy", dest="mode", action="store_const", const="proxy", help="the CPU host-overhead proxy")
    parser.add_argument("--mode", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--stages", nargs="+", help="run only these stages")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all stages")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args(argv)
    mode = args.mode or ("full" if torch.cuda.is_available() else "tiny")
    out = Path(args.out)
    if args.stage:
        stage = next(s for s in stages_for(mode) if s.name == args.stage)
        (out / f"{stage.name}.json").write_text(json.dumps(run_stage(stage), indent=2) + "\n")
        try:
            from hp_deepspeed.launching.distributed import shutdown_distributed
        except ImportError:  # the tree before issue 13 (the "before" proxy run) exits as it did
            return
        shutdown_distributed()  # a stage that trained leaves a process group
        return
    drive(mode, out, args.stages, args.budget_s)


if __name__ == "__main__":
    main()
