"""bench/gpu.py's CPU mode: every kind of stage runs in its own subprocess and writes its JSON, so
the one GPU command cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

from bench.gpu_stages import FULL_STAGES, stages_for

REPO = Path(__file__).resolve().parents[2]
# One stage of each kind, covering every runner type: plain, the default config, ZeRO-3, HF.
STAGES = ["attention", "default_config", "large_default", "large_zero3", "host"]


def test_tiny_mode_mirrors_the_gpu_stages():
    tiny = stages_for("tiny")
    assert [s.name for s in tiny] == [s.name for s in FULL_STAGES]
    assert all(t.runners == f.runners and t.kind == f.kind for t, f in zip(tiny, FULL_STAGES))


def test_cpu_run_writes_a_result_per_stage(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(tmp_path), "--stages", *STAGES],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    results = {r["stage"]["name"]: r for r in summary["stages"]}
    assert sorted(results) == sorted(STAGES)
    assert not [r["error"] for r in results.values() if "error" in r]
    for name in ("large_default", "large_zero3"):
        runners = results[name]["runners"]
        assert all(r["step_s_median"] > 0 and r["tokens_per_s"] > 0 and r["flops"] > 0 for r in runners.values())
    assert results["large_zero3"]["runners"]["zero3_hf"]["zero_optimization"]["stage"] == 3
    # Every engine ran with torch's linear: the project's ZeRO-3 keeps it (training/parallelism.py),
    # and nothing in the benchmark replaces it (bench/gpu_runners.py records the one in effect).
    host = results["host"]["runners"]
    assert {r["linear"] for r in host.values()} == {"torch._C._nn.linear"}, {n: r["linear"] for n, r in host.items()}
    # The host stage runs the GPU's code paths on the CPU too (bench.gpu.gpu_precision): bf16, where
    # the project's fp32 gradient accumulation makes a forced stage 0 DeepSpeed's BF16_Optimizer.
    assert [host[n]["zero_optimization"]["stage"] for n in ("zero0_none", "zero2_none", "zero3_none",
                                                            "zero3_per_module_none")] == [1, 2, 3, 3]
    assert all(r["bf16"] for r in host.values())
    assert {n: host[n]["optimizer"] for n in ("plain_hp_global", "zero0_hp_global", "zero3_none")} == {
        "plain_hp_global": "AdamW(fused=True)", "zero0_hp_global": "BF16_Optimizer",
        "zero3_none": "DeepSpeedZeroOptimizer_Stage3"}
    assert results["large_default"]["runners"]["plain_none"]["optimizer"] == "AdamW(fused=False)"  # fp32 CPU stage
    assert results["large_default"]["runners"]["default_hp_global_compiled"]["compiled"]
    assert all(r["profile_top"] for r in results["large_default"]["runners"].values())  # where the step goes
    assert results["large_zero3"]["runners"]["zero3_none"]["profile_top"]  # the profiler table
    calls = results["attention"]["calls"]["bfloat16_weights"]
    assert calls and all(c["bias_dtype"] == "torch.bfloat16" and c["scale"] == 1.0 for c in calls)
    assert {c["gpus"] for c in results["default_config"]["choices"]} == {1, 8, 64}
    assert (tmp_path / "large_zero3.json").is_file()
    # The speed targets, read from side-by-side runners: the stages run here give the three
    # ratios of large_default and large_zero3; the CPU has no MFU peak; the rest were not run.
    targets = {t["target"].split(",")[0]: t for t in summary["targets"]}
    hf = next(t for t in summary["targets"] if t["target"].startswith("transformers"))
    runners = results["large_zero3"]["runners"]
    assert hf["value"] == runners["zero3_hf"]["step_s_median"] / runners["zero3_none"]["step_s_median"]
    assert hf["met"] == (hf["value"] >= 2.0)
    assert targets["t5-large b16 MFU"]["why"] == "no known peak for this device"
    assert targets["t5-v1_1-xl b16 MFU"]["why"] == "stage not run"
    assert "verdict" in done.stdout
