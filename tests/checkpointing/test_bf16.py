"""bf16 ZeRO-3, the GPU default, on 2 CPU ranks (DeepSpeed 0.19.8 runs bf16 on the CPU with gloo):
training moves the weights, a save records precision bf16 and resumes exactly (weights, fp32
master weights, Adam moments, RNG: the continuation's losses are bit-identical), and an fp32 job
refuses that checkpoint with the precision named."""

from __future__ import annotations

import math

import pytest
import torch

from hp_deepspeed.testing.ranks import run_ranks

pytestmark = [pytest.mark.distributed]


def bf16_body(run_dir: str) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from hp_deepspeed.checkpointing import CheckpointConfig, CheckpointError, CheckpointManager
    from tests.checkpointing.toy import MODEL_CONFIG, make_engine, rng_fingerprint, seed, snapshot, train_step

    config = CheckpointConfig(interval=2, keep_last=2)
    seed(1)
    engine = make_engine(bf16=True)
    out = {"bf16": engine.bfloat16_enabled(),
           "param_dtype": str(next(engine.module.parameters()).dtype),
           "initial": safe_get_full_fp32_param(engine.module.inp.weight).clone()}
    manager = CheckpointManager(config, run_dir, model_config=MODEL_CONFIG)
    out["losses"] = {step: train_step(engine, step) for step in range(1, 5)}
    manager.save(engine, 4)
    out["saved"], out["saved_rng"] = snapshot(engine), rng_fingerprint()
    out["continued"] = {step: train_step(engine, step) for step in range(5, 7)}

    seed(99)
    engine = make_engine(bf16=True, init_seed=5)
    state = load_as_the_trainer_does(config, run_dir, engine)
    out["state"] = state
    out["resumed"], out["resumed_rng"] = snapshot(engine), rng_fingerprint()
    out["replayed"] = {step: train_step(engine, step) for step in range(5, 7)}
    try:
        load_as_the_trainer_does(config, run_dir, make_engine(bf16=False))
        out["fp32_error"] = None
    except CheckpointError as err:
        out["fp32_error"] = str(err)
    return out


def load_as_the_trainer_does(config, run_dir, engine):
    from hp_deepspeed.checkpointing import CheckpointManager
    from tests.checkpointing.toy import MODEL_CONFIG

    manager = CheckpointManager(config, run_dir, model_config=MODEL_CONFIG)
    return manager.load(engine, manager.find_resume_point())


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    return run_ranks("tests.checkpointing.test_bf16:bf16_body", 2, timeout=480,
                     args=(str(tmp_path_factory.mktemp("bf16")),))


def test_bf16_zero3_trains_on_the_cpu(bf16_run):
    for r in bf16_run:
        assert r["bf16"] and r["param_dtype"] == "torch.bfloat16"
        assert all(math.isfinite(v) for v in r["losses"].values())
        moved = (r["saved"]["inp.weight.fp32"] - r["initial"]).abs().max()
        assert moved > 1e-3  # 4 AdamW steps at lr up to 2e-3 each
    assert bf16_run[0]["losses"] == bf16_run[1]["losses"]  # the global mean, the same on each rank


def test_bf16_checkpoint_resumes_exactly(bf16_run):
    for r in bf16_run:
        assert r["state"] == {"step": 4}
        assert r["saved"].keys() == r["resumed"].keys()
        for key in r["saved"]:
            assert torch.equal(r["saved"][key], r["resumed"][key]), key
        assert torch.equal(r["saved_rng"]["torch"], r["resumed_rng"]["torch"])
        assert r["replayed"] == r["continued"]


def test_an_fp32_job_refuses_a_bf16_checkpoint(bf16_run):
    for r in bf16_run:
        assert "precision: checkpoint has 'bf16', this job has 'fp32'" in r["fp32_error"]
