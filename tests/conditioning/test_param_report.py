"""The parameter report counts what the formulas in docs/hyperprompt.md say, on the meta device."""

import pytest

from hp_deepspeed.model.conditioning import ConditioningConfig
from hp_deepspeed.model.param_report import count_parameters, main, parameter_report
from hp_deepspeed.model.t5_config import T5Config


def expected(variant: str, c: T5Config, cfg: ConditioningConfig, tasks: int) -> int:
    l, b, d = cfg.prompt_length, cfg.bottleneck, c.d_model
    e, m = c.num_heads * c.d_kv, c.num_layers + c.num_decoder_layers
    t, tk, tz, h = cfg.hyper_embedding_dim, cfg.task_embedding_dim, cfg.layer_embedding_dim, cfg.projector_hidden_dim
    projector = tasks * tk + m * tz + (tk + tz) * h + h + h * t + t      # I(t, m) = h_t([k_t; z_m])
    # HyperFormer++: I(t, m, s) adds the 2 block-type rows y_s to the projector's input; linear
    # generators with biases for D, U, their biases and the layer norm's gain and bias.
    hyper_projector = projector + 2 * tz + tz * h
    adapter = 2 * d * b + b + 3 * d                                      # per site: D, U, biases, norm
    return {
        "prompt_tuning": tasks * l * d,
        "kv_prompt": tasks * 2 * m * l * e,
        "hyperprompt_share": tasks * l * d + 2 * m * b * (d + e),
        "hyperprompt_sep": tasks * l * d + tasks * 2 * m * b * (d + e),
        "hyperprompt_global": tasks * l * d + projector + 2 * t * b * (d + e),
        "hyperformer": hyper_projector + (t + 1) * adapter,
        "adapter": tasks * m * 2 * adapter,
    }[variant]


# t5-11b: heads * d_kv (16384) != d_model (1024), so a mixed-up width cannot pass.
@pytest.mark.parametrize("preset", ["t5-small", "t5-11b"])
def test_counts_follow_the_documented_formulas(preset):
    cfg = ConditioningConfig()
    rows = parameter_report([preset], num_tasks=8)
    assert len(rows) == 7
    for row in rows:
        assert row.conditioning == expected(row.variant, T5Config.from_pretrained(preset), cfg, 8), row.variant
    assert len({row.backbone for row in rows}) == 1


def test_xxl_default_global_is_near_the_papers_ratio():
    row = count_parameters("google/t5-v1_1-xxl", ConditioningConfig())
    assert 11.0e9 < row.backbone < 11.3e9
    assert 0.001 < row.ratio < 0.002  # the paper: "as few as 0.14%"; docs/hyperprompt.md has the exact value


def test_main_prints_the_table_with_overrides(capsys):
    main(["--presets", "t5-small", "--variants", "hyperprompt_global", "--set", "bottleneck=8"])
    text = capsys.readouterr().out
    # Expected cells from the documented formula with the override, and t5-small's well-known
    # 60,506,624 backbone parameters (tied embedding counted once): not from the code under test.
    cond = expected("hyperprompt_global", T5Config.from_pretrained("t5-small"), ConditioningConfig(bottleneck=8), 8)
    assert cond != expected("hyperprompt_global", T5Config.from_pretrained("t5-small"), ConditioningConfig(), 8)
    assert "bottleneck=8" in text
    assert f"| t5-small | 60.51M | {cond / 1e6:.2f}M ({100 * cond / 60_506_624:.3f}%) |" in text.splitlines()


def test_the_bottleneck_the_papers_ratio_implies_solves_the_documented_formula():
    from hp_deepspeed.model.param_report import PAPER_PRESET, PAPER_RATIO, implied_bottleneck

    cfg = ConditioningConfig(prompt_length=16, hyper_embedding_dim=32)
    found = implied_bottleneck(base=cfg, num_tasks=8)
    c = T5Config.from_pretrained(PAPER_PRESET)
    # The formula is affine in b: solve it by hand from two of its values.
    at = {b: expected("hyperprompt_global", c, ConditioningConfig(prompt_length=16, hyper_embedding_dim=32,
                                                                  bottleneck=b), 8) for b in (1, 2)}
    exact = 1 + (PAPER_RATIO * found.row.backbone - at[1]) / (at[2] - at[1])
    assert found.exact_bottleneck == pytest.approx(exact)
    assert 20 < found.exact_bottleneck < 40  # a regression guard on the docs' number (28.7)
    assert found.bottleneck == round(exact)
    assert found.row.conditioning == expected(
        "hyperprompt_global", c, ConditioningConfig(prompt_length=16, hyper_embedding_dim=32, bottleneck=found.bottleneck), 8)
    assert abs(found.row.ratio - PAPER_RATIO) < 0.00005


def test_main_paper_prints_one_row_per_setting(capsys):
    main(["--paper"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 6 and all("0.14" in row or "0.13" in row for row in rows), rows
