"""The rules that only a GPU run would exercise, checked on the CPU.

Device choice per rank, a CPU run on a GPU host, TORCH_CUDA_ARCH_LIST, the optimizer and the
gradient-accumulation dtype of the assembled DeepSpeed config, where the universal-checkpoint
repair puts Adam's step, the conditioning's device, init independent of the build path, and
output types ZeRO-3's hooks can see into.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hp_deepspeed.checkpointing.manager import own_step
from hp_deepspeed.compat import deepspeed as compat_deepspeed
from hp_deepspeed.compat import torch as compat_torch
from hp_deepspeed.errors import LaunchEnvironmentError
from hp_deepspeed.launching import device
from hp_deepspeed.model import random_init
from hp_deepspeed.model.layer_conditioning import ConditioningOutput, LayerConditioning
from hp_deepspeed.model.t5 import T5Output
from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
from hp_deepspeed.training.optim import OptimConfig
from hp_deepspeed.training.parallelism import ModelSize
from hp_deepspeed.testing.ranks import base_env, free_port

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


# ----------------------------------------------------------------------------- which GPU

@pytest.mark.parametrize("local_rank, local_world, count, visible, expected", [
    (3, 8, 8, None, 3),          # deepspeed launcher / torchrun: every rank sees the node's GPUs
    (3, 8, 8, "0,1,2,3,4,5,6,7", 3),
    (1, 2, 4, None, 1),          # fewer ranks than GPUs
    (5, 8, 1, "5", 0),           # srun --gpus-per-task=1: bound to its own GPU
])
def test_device_index(local_rank, local_world, count, visible, expected):
    assert device.cuda_device_index(local_rank, local_world, count, visible) == expected


@pytest.mark.parametrize("local_rank, local_world, count, visible, match", [
    (1, 2, 1, None, "ranks would share a GPU"),       # two ranks, one GPU on the node
    (3, 8, 2, "0,1", "ranks would share a GPU"),      # 2 GPUs for 8 ranks: the old modulo rule
    (0, 1, 0, None, "no GPU for NCCL; set HP_DEVICE=cpu"),
])
def test_device_index_refuses_sharing(local_rank, local_world, count, visible, match):
    with pytest.raises(LaunchEnvironmentError, match=match) as err:
        device.cuda_device_index(local_rank, local_world, count, visible)
    assert f"local rank {local_rank} of {local_world}" in str(err.value)


def test_init_distributed_tells_deepspeed_the_chosen_gpu(monkeypatch):
    """Under NCCL a bound rank (LOCAL_RANK 5, one visible GPU) uses cuda:0, and DeepSpeed, which
    takes cuda:LOCAL_RANK, is told 0; the process group is faked."""
    import deepspeed

    from hp_deepspeed.launching import distributed

    calls = {}
    for key, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="5", LOCAL_WORLD_SIZE="8",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", CUDA_VISIBLE_DEVICES="5").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(device, "prepare_process", lambda env=None: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.setdefault("local_rank", os.environ["LOCAL_RANK"]))
    info = distributed.init_distributed(backend="nccl")
    assert info.local_rank == 5 and calls == {"set_device": 0, "local_rank": "0"}


def test_a_bound_rank_under_open_mpi_passes_deepspeeds_local_rank_check(monkeypatch):
    """mpirun with one GPU bound per rank: local rank 3 uses cuda:0 and exports LOCAL_RANK=0.
    DeepSpeed's engine asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK; its own check is run."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    from hp_deepspeed.launching import distributed

    for key, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", LOCAL_WORLD_SIZE="4",
                           OMPI_COMM_WORLD_LOCAL_RANK="3", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999", CUDA_VISIBLE_DEVICES="3").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(device, "prepare_process", lambda env=None: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    distributed.init_distributed(backend="nccl")

    class Args:
        local_rank = None

    fake = DeepSpeedEngine.__new__(DeepSpeedEngine)
    torch.nn.Module.__init__(fake)
    fake._configure_with_arguments(Args(), None)  # raises AssertionError on a mismatch
    assert fake.local_rank == 0 and os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"


# ----------------------------------------------------------------------------- CPU run on a GPU host

@pytest.mark.parametrize("env", [{"HP_DEVICE": "cpu"}, {"HP_DEVICE": "CPU"}, {"HP_DIST_BACKEND": "gloo"}])
def test_a_cpu_run_on_a_gpu_host_is_a_cpu_run_for_deepspeed(env, monkeypatch):
    monkeypatch.setattr(device, "_cuda_device_count", lambda: 8)
    env = dict(env, CUDA_VISIBLE_DEVICES="0,1")
    device.prepare_process(env)
    assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""


def test_a_gpu_run_keeps_its_gpus(monkeypatch):
    monkeypatch.setattr(device, "_cuda_device_count", lambda: 8)
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    device.prepare_process(env)
    assert "DS_ACCELERATOR" not in env and env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_deepspeed_imported_with_cuda_is_refused(monkeypatch):
    import deepspeed.accelerator.real_accelerator as real

    class Cuda:
        def device_name(self):
            return "cuda"

    monkeypatch.setattr(real, "ds_accelerator", Cuda())
    with pytest.raises(LaunchEnvironmentError, match="DS_ACCELERATOR=cpu"):
        device.prepare_process({"HP_DEVICE": "cpu"})


def test_preflight_exports_the_cpu_accelerator_for_the_launcher(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[2] / "launch" / "preflight.sh"
    out = subprocess.run(["bash", "-c", f'source "{script}" report; echo "${{DS_ACCELERATOR:-none}}"'],
                         env={"PATH": os.environ["PATH"], "HP_DEVICE": "cpu"}, capture_output=True, text=True)
    assert out.stdout.strip() == "cpu", out.stderr


# ----------------------------------------------------------------------------- TORCH_CUDA_ARCH_LIST

@pytest.mark.parametrize("value, expected", [
    ("9.0a", "9.0"),
    ("8.0;9.0a", "8.0;9.0"),
    ("8.0 9.0a+PTX", "8.0;9.0+PTX"),
    ("9.0;9.0a", "9.0"),
    ("10.0f;12.0a", "10.0;12.0"),
])
def test_arch_list_is_made_parsable(value, expected):
    fixed, note = compat_deepspeed.sanitize_arch_list(value)
    assert fixed == expected and note is not None
    # What DeepSpeed 0.19.8's builder then does with each entry (builder.py, compute_capability_args).
    [tuple(int(part.split("+")[0]) for part in cc.split(".")) for cc in fixed.split(";")]


def test_a_clean_arch_list_is_left_alone():
    assert compat_deepspeed.sanitize_arch_list("8.0;9.0+PTX") == ("8.0;9.0+PTX", None)
    with pytest.raises(LaunchEnvironmentError, match="TORCH_CUDA_ARCH_LIST='Hopper'"):
        compat_deepspeed.sanitize_arch_list("Hopper")


def test_gpu_process_gets_a_parsable_arch_list(monkeypatch, capsys):
    monkeypatch.setattr(device, "_cuda_device_count", lambda: 1)
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    device.prepare_process(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and "9.0a" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the ninja of op builds

def _tool(folder: Path, name: str = "ninja") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / name
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    return tool


@pytest.fixture
def ninjas(tmp_path) -> tuple[Path, Path]:
    """A venv's bin and a system bin, each with a ninja."""
    venv, system = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    _tool(venv), _tool(system)
    return venv, system


def test_a_rank_started_over_ssh_builds_ops_with_the_environments_ninja(ninjas):
    """sshd's PATH finds the system's ninja; the interpreter's own goes first."""
    venv, system = ninjas
    env = {"PATH": f"{system}:/bin"}
    compat_torch.environment_ninja_first(env, executable=str(venv / "python"))
    assert env["PATH"] == f"{venv}:{system}:/bin"
    env = {}  # no PATH at all
    compat_torch.environment_ninja_first(env, executable=str(venv / "python"))
    assert env["PATH"] == str(venv)


def test_path_is_left_alone_when_it_already_finds_that_ninja_or_there_is_none(ninjas, tmp_path):
    venv, system = ninjas
    env = {"PATH": f"{venv}:{system}"}
    compat_torch.environment_ninja_first(env, executable=str(venv / "python"))
    assert env["PATH"] == f"{venv}:{system}"
    bare = tmp_path / "bare" / "bin"
    _tool(bare, "python")
    env = {"PATH": str(system)}
    compat_torch.environment_ninja_first(env, executable=str(bare / "python"))
    assert env["PATH"] == str(system)


def test_prepare_process_puts_the_environments_ninja_first(tmp_path, monkeypatch):
    venv = tmp_path / "venv" / "bin"
    _tool(venv)
    monkeypatch.setattr(device.sys, "executable", str(venv / "python"))
    monkeypatch.setattr(device, "_cuda_device_count", lambda: 0)
    env = {"PATH": "/usr/bin:/bin"}
    device.prepare_process(env)
    assert env["PATH"].split(":")[0] == str(venv)


def test_each_python_environment_builds_its_ops_in_its_own_folder_unless_one_is_chosen(monkeypatch):
    """Two environments sharing one build folder rebuild each other's ops at every rank start."""
    monkeypatch.setattr(device, "_cuda_device_count", lambda: 0)
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    first = {}
    device.prepare_process(first)  # what every rank and `make shm-op` apply
    folder = Path(first["TORCH_EXTENSIONS_DIR"])
    assert folder.parent == Path("/home/u/.cache/torch_extensions") and folder.name.startswith("py3")
    again = {}
    compat_torch.environment_extensions_dir(again)
    assert again["TORCH_EXTENSIONS_DIR"] == first["TORCH_EXTENSIONS_DIR"]  # the same environment finds its build again
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")
    other = {}
    compat_torch.environment_extensions_dir(other)
    assert other["TORCH_EXTENSIONS_DIR"] != first["TORCH_EXTENSIONS_DIR"]
    chosen = {"TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    compat_torch.environment_extensions_dir(chosen)
    assert chosen == {"TORCH_EXTENSIONS_DIR": "/scratch/ext"}


# ----------------------------------------------------------------------------- assembled DeepSpeed config

# A t5-small-like model for the "auto" ZeRO stage of auto_bf16.json.
SMALL = ModelSize(total_params=60_000_000, trainable_params=60_000_000, largest_param=16_000_000,
                  block_params=2_000_000)


def _assemble(name: str, on_cpu: bool = False, world_size: int = 8, **optim) -> dict:
    os.environ.setdefault("HP_NVME_PATH", "/nvme")
    return build_ds_config(read_ds_config(DS_CONFIGS / name), micro_batch_size=2, gradient_accumulation=4,
                           world_size=world_size, optim=OptimConfig(**optim), d_model=64, log_every=10,
                           on_cpu=on_cpu, model_size=SMALL)


@pytest.mark.parametrize("name", sorted(p.name for p in DS_CONFIGS.glob("*.json")))
def test_bf16_accumulates_gradients_in_fp32(name):
    cfg = _assemble(name)
    if cfg.get("bf16", {}).get("enabled"):
        assert cfg["data_types"]["grad_accum_dtype"] == "fp32"
    else:
        assert "data_types" not in cfg


_SANITY_CHECK = """
import json, sys, torch, deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
deepspeed.init_distributed(dist_backend="gloo")
for name, cfg in json.loads(sys.stdin.read()).items():
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only the config-reading methods are used
    object.__setattr__(engine, "_config", DeepSpeedConfig(cfg))
    object.__setattr__(engine, "pipeline_parallelism", False)
    object.__setattr__(engine, "global_rank", 0)
    try:
        engine._do_optimizer_sanity_check(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
        print("OK", name)
    except Exception as err:
        print("REFUSED", name, type(err).__name__, err)
"""


def test_deepspeed_accepts_the_data_types_and_stage_we_assemble(tmp_path):
    """DeepSpeed's own check of the precision/stage mix, on every assembled config: 0.19.8 has no
    engine for bf16 weights with fp32 accumulation at stage 0 (NotImplementedError at the first GPU
    run), the stage the auto config picks on one GPU. One process of world size 1 (DeepSpeedConfig
    needs a process group) checks them all."""
    configs = {}
    for path in sorted(DS_CONFIGS.glob("*.json")):
        for world_size in (1, 8):
            cfg = _assemble(path.name, world_size=world_size)
            # DeepSpeedConfig checks the global batch against the checking process's world of one.
            cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
            configs[f"{path.name}@{world_size}"] = cfg
    env = base_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                    "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"})
    result = subprocess.run([sys.executable, "-c", _SANITY_CHECK], input=json.dumps(configs), env=env,
                            capture_output=True, text=True, timeout=300)
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("OK", "REFUSED"))]
    assert len(verdicts) == len(configs), result.stdout + result.stderr
    assert all(v.startswith("OK") for v in verdicts), "\n".join(verdicts)


_LINEAR_CHECK = """
import json, sys, torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from hp_deepspeed.model.builder import ModelConfig, build_backbone
from hp_deepspeed.training.parallelism import mark_leaf_blocks
original = torch.nn.functional.linear
for cfg in json.loads(sys.stdin.read()):  # DeepSpeed's replacement stays: the project's config first
    model = build_backbone(ModelConfig(name_or_path="tiny-v1_0"), ds_config=cfg)  # inside zero.Init
    print("leaf blocks", mark_leaf_blocks(model, cfg))
    deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    print("KEPT" if torch.nn.functional.linear is original else "REPLACED")
"""


def test_zero3_leaves_torchs_linear_alone():
    """zero.Init and deepspeed.initialize under the project's ZeRO-3 config keep
    torch.nn.functional.linear (DeepSpeed's default replaces it process-wide with a Python
    autograd Function; training/parallelism.py says why); a file that asks for it gets it. The
    same process marks the trainer's leaf blocks (tiny-v1_0: 2 + 3 blocks, each stack's first
    excluded)."""
    cfg = _assemble("zero3_cpu_test.json", on_cpu=True, world_size=1)
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
    asks = json.loads(json.dumps(cfg))
    asks["zero_optimization"]["memory_efficient_linear"] = True
    env = base_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                    "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"})
    result = subprocess.run([sys.executable, "-c", _LINEAR_CHECK], input=json.dumps([cfg, asks]), env=env,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("leaf", "KEPT", "REPLACED"))]
    assert lines == ["leaf blocks 3", "KEPT", "leaf blocks 3", "REPLACED"], result.stdout[-2000:] + result.stderr[-3000:]


def test_deepspeed_reads_the_accumulation_dtype_we_write():
    # The two calls DeepSpeedConfig (runtime/config.py) and the engine's get_data_types make.
    from deepspeed.runtime.config import GRAD_ACCUM_DTYPE, DtypeEnum, get_data_types_params

    value = get_data_types_params(_assemble("zero3_bf16.json")).get(GRAD_ACCUM_DTYPE)
    assert DtypeEnum(value).value == torch.float32


def test_optimizer_choice():
    params = lambda name, **kw: _assemble(name, **kw)["optimizer"]["params"]  # noqa: E731
    # GPU default: torch's fused AdamW, nothing to compile.
    assert params("zero3_bf16.json")["torch_adam"] is True and params("zero3_bf16.json")["fused"] is True
    # Optimizer offload: DeepSpeedCPUAdam (no torch_adam), whichever implementation is asked for.
    assert "torch_adam" not in params("zero3_offload_cpu.json")
    assert "torch_adam" not in params("zero3_offload_cpu.json", implementation="deepspeed")
    # Asked for: DeepSpeed's FusedAdam on the GPU.
    assert "torch_adam" not in params("zero2_bf16.json", implementation="deepspeed")
    # CPU: torch's AdamW, unfused.
    cpu = params("zero3_cpu_test.json", on_cpu=True, implementation="deepspeed")
    assert cpu["torch_adam"] is True and "fused" not in cpu


# ----------------------------------------------------------------------------- universal repair

def test_universal_repair_puts_the_step_where_fused_adamw_wants_it():
    step = torch.tensor(7.0, dtype=torch.float64)
    exp_avg = torch.empty(3, device="meta")  # stands for a moment on the parameter's CUDA device
    fused = own_step(step, exp_avg, on_device=True)
    assert fused.device.type == "meta" and fused.dtype == torch.float32
    plain = own_step(step, exp_avg, on_device=False)
    assert plain.device.type == "cpu" and plain is not step and plain.item() == 7.0


# ----------------------------------------------------------------------------- conditioning device

def test_precomputed_conditioning_lives_on_one_device():
    from hp_deepspeed.model.conditioning import PrecomputedConditioning

    per_task = {"key_prompt": torch.empty(2, 3, 4, device="meta")}
    pre = PrecomputedConditioning(per_task, torch.tensor([0, 2]), (("encoder", 3),), num_tasks=3)
    assert {b.device.type for b in pre.buffers()} == {"meta"}


def test_with_conditioning_moves_it_to_the_backbone_device():
    from hp_deepspeed.model.conditioning import PrecomputedConditioning
    from hp_deepspeed.model.hyperprompt_t5 import HyperPromptT5

    backbone = torch.nn.Linear(2, 2, device="meta")
    model = HyperPromptT5(backbone, None)
    loaded = PrecomputedConditioning({"key_prompt": torch.zeros(1, 3, 4)}, torch.tensor([0]), (("encoder", 3),), 1)
    served = model.with_conditioning(loaded)
    assert {b.device.type for b in served.conditioning.buffers()} == {"meta"}


# ----------------------------------------------------------------------------- init and output types

def test_random_init_draws_on_the_cpu_whatever_the_parameter():
    """A bf16 parameter (as under zero.Init with bf16, on any device) gets the CPU fp32 draw."""
    param = torch.empty(4, 5, dtype=torch.bfloat16)
    torch.manual_seed(3)
    random_init.normal_(param, 0.5)
    torch.manual_seed(3)
    assert torch.equal(param, (torch.randn(4, 5) * 0.5).to(torch.bfloat16))


def test_outputs_are_types_zero3_hooks_walk():
    from deepspeed.runtime.zero.utils import apply_to_tensors_only

    seen = []
    touch = lambda t: seen.append(t) or t + 0  # noqa: E731
    layer = LayerConditioning(key_prompt=torch.ones(1))
    cond = ConditioningOutput(input_prompt=torch.ones(1), encoder=[layer, LayerConditioning()])
    out = apply_to_tensors_only(touch, cond)
    assert isinstance(out, ConditioningOutput) and isinstance(out.encoder[0], LayerConditioning)
    assert len(seen) == 2
    t5 = apply_to_tensors_only(touch, T5Output(logits=torch.ones(1), loss=torch.ones(())))
    assert isinstance(t5, T5Output) and len(seen) == 4
    assert "extras" not in T5Output._fields and "extras" not in ConditioningOutput._fields
