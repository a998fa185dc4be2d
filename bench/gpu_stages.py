"""What ``bench.gpu`` runs: its engines (:class:`Runner`) and stages (:class:`Stage`), GPU and CPU sizes.

Owns: the tables of stages and runners, and their CPU-size versions (``tiny``, ``proxy``).
Does not own: building and timing a runner inside a stage's subprocess (``gpu_runners.py``),
nor starting the subprocesses and reading the targets (``gpu.py``). What each stage and runner
measures is described in ``bench/gpu.py``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

NUM_TASKS = 8


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
# time). Last on a GPU; in --proxy mode on the CPU beside the host-overhead proxy.
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
    # of the Hugging Face rule (buckets d_model^2, persistence 10 d_model) beside the project's.
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
# The host-overhead proxy (CPU): ZeRO-3 at world size 1 over plain PyTorch, ours and transformers'.
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
