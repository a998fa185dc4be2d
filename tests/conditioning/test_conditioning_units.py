"""The conditioning module's smaller promises, one at a time (written against a mutation run of
model/conditioning.py, see docs/mutation/conditioning.md): the initial scales docs/hyperprompt.md documents, the
config's bounds, which blocks a placement conditions, when every task is generated instead of the
distinct ones, and the precomputed (serving) form's task bookkeeping and file format."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import T5Config

from hp_deepspeed.model.conditioning import (
    BackboneDims,
    ConditioningConfig,
    PrecomputedConditioning,
    TaskConditioning,
    build_conditioning,
    conditioned_sides,
)

# Wide enough that the std of a generated tensor estimates its initial scale to a few percent
# (HyperPrompt-Global's spreads most, through the random second moment of I(t, m)).
WIDE = BackboneDims(d_model=64, num_heads=4, d_kv=8, num_encoder_layers=4, num_decoder_layers=4)
WIDE_CFG = dict(prompt_length=8, bottleneck=32, task_embedding_dim=32, layer_embedding_dim=32,
                projector_hidden_dim=256, hyper_embedding_dim=32)
WIDE_TASKS = 8
# Distinct from each other and from the defaults, so a std read from the wrong setting shows.
STDS = dict(prompt_init_std=0.3, input_prompt_init_std=0.7, adapter_init_std=0.05)

SMALL = BackboneDims(d_model=16, num_heads=2, d_kv=4, num_encoder_layers=2, num_decoder_layers=3)
SMALL_CFG = dict(prompt_length=3, bottleneck=5, task_embedding_dim=6, layer_embedding_dim=7,
                 projector_hidden_dim=9, hyper_embedding_dim=4)
NUM_TASKS = 4
ALL_VARIANTS = ["prompt_tuning", "kv_prompt", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global",
                "hyperformer", "adapter"]


def wide(variant: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ConditioningConfig(variant=variant, **{**WIDE_CFG, **STDS, **overrides})
    cond = build_conditioning(cfg, WIDE, WIDE_TASKS)
    with torch.no_grad():
        return cond, cond.generator(torch.arange(WIDE_TASKS))


def small(variant: str, placement: str = "both"):
    torch.manual_seed(0)
    return build_conditioning(ConditioningConfig(variant=variant, placement=placement, **SMALL_CFG), SMALL, NUM_TASKS)


def blocks(out):
    return (out.encoder or []) + (out.decoder or [])


def assert_scale(tensor: torch.Tensor, expected: float, rel: float, what: str) -> None:
    got = tensor.std().item()
    assert expected * (1 - rel) < got < expected * (1 + rel), f"{what}: std {got:.4g}, expected ~{expected:.4g}"


# ---------------------------------------------------------------- initial scales (docs/hyperprompt.md)


@pytest.mark.parametrize("variant", ["hyperprompt_share", "hyperprompt_sep", "hyperprompt_global"])
@pytest.mark.parametrize("seed", [0, 1])
def test_generated_prompts_start_at_prompt_init_std(variant, seed):
    """docs/hyperprompt.md: the up-projection is scaled so that the prompts come out at
    prompt_init_std (on unit-scale global prompts, the default), key and value prompts alike."""
    _, out = wide(variant, seed)
    rel = 0.35 if variant == "hyperprompt_global" else 0.1  # Global: I(t, m)'s random second moment
    for name in ("key_prompt", "value_prompt"):
        assert out[name].shape == (WIDE_TASKS, 8, WIDE.num_heads, 8, WIDE.d_kv)
        assert_scale(out[name], STDS["prompt_init_std"], rel, f"{variant} {name}")


@pytest.mark.parametrize("variant", ["hyperprompt_share", "hyperprompt_sep", "hyperprompt_global"])
def test_global_prompts_start_at_their_std_and_the_local_hypernetworks_have_no_bias(variant):
    """P_t starts at global_prompt_init_std. The local hypernetworks U(ReLU(D(P))) have no
    biases (docs/hyperprompt.md), so the prompts are positively homogeneous in P: doubling the
    global prompts doubles the key and value prompts."""
    cond, out = wide(variant, global_prompt_init_std=2.0)
    assert_scale(cond.generator.global_prompts, 2.0, 0.05, "global prompts")
    with torch.no_grad():
        cond.generator.global_prompts.mul_(2.0)
        doubled = cond.generator(torch.arange(WIDE_TASKS))
    for name in ("key_prompt", "value_prompt"):
        torch.testing.assert_close(doubled[name], 2 * out[name], rtol=1e-4, atol=1e-5)


def test_global_generated_down_projection_is_fan_in_initialised():
    """HyperPrompt-Global: I(t, m) has second moment ~0.5 per entry, and the generated
    D(t, m) = sum_j I_j W_D[j] starts ~N(0, 1/d_model), the fan-in scale of a stored D."""
    cond, _ = wide("hyperprompt_global")
    emb = cond.generator.task_layer_embedding(torch.arange(WIDE_TASKS)).detach()
    assert emb.shape == (WIDE_TASKS, 8, WIDE_CFG["hyper_embedding_dim"])
    assert 0.35 < emb.square().mean().item() < 0.7
    down = torch.einsum("umj,kjdb->kumdb", emb, cond.generator.down_generator.detach())
    assert_scale(down, WIDE.d_model**-0.5, 0.2, "generated D")


def test_hyperformer_task_layer_site_embedding_has_the_documented_second_moment():
    """HyperFormer++'s I(t, m, s) = h_t([k_t; z_m; y_s]) (unit-scale embeddings through the
    fan-in Linear-ReLU-Linear projector): ~0.5 per entry, what its generators' init assumes."""
    cond, _ = wide("hyperformer")
    emb = cond.generator.task_layer_embedding(torch.arange(WIDE_TASKS)).detach()
    assert emb.shape == (WIDE_TASKS, 8, 2, WIDE_CFG["hyper_embedding_dim"])
    assert 0.35 < emb.square().mean().item() < 0.7


def test_share_and_sep_down_projections_are_fan_in_initialised():
    for variant in ("hyperprompt_share", "hyperprompt_sep"):
        cond, _ = wide(variant)
        assert_scale(cond.generator.down, WIDE.d_model**-0.5, 0.05, f"{variant} D")


def test_stored_prompts_start_at_their_std():
    """kv_prompt stores its prompts at prompt_init_std; Prompt-Tuning's soft prompt is at
    input_prompt_init_std (distinct settings, so neither reads the other's)."""
    _, kv = wide("kv_prompt")
    for name in ("key_prompt", "value_prompt"):
        assert_scale(kv[name], STDS["prompt_init_std"], 0.05, name)
    _, soft = wide("prompt_tuning")
    assert soft["input_prompt"].shape == (WIDE_TASKS, 8, WIDE.d_model)
    assert_scale(soft["input_prompt"], STDS["input_prompt_init_std"], 0.05, "input prompt")


def test_plain_adapters_start_near_the_identity():
    """Adapter: fan-in D and U, zero biases, layer-norm gain exactly adapter_init_std."""
    _, out = wide("adapter")
    lead = (WIDE_TASKS, 8, 2)
    assert out["adapter_down"].shape == (*lead, WIDE.d_model, 32)
    assert_scale(out["adapter_down"], WIDE.d_model**-0.5, 0.05, "D")
    assert_scale(out["adapter_up"], 32**-0.5, 0.05, "U")
    for name in ("adapter_down_bias", "adapter_up_bias", "adapter_norm_bias"):
        assert torch.equal(out[name], torch.zeros_like(out[name])), name
    assert torch.equal(out["adapter_norm_weight"], torch.full((*lead, WIDE.d_model), STDS["adapter_init_std"]))


@pytest.mark.parametrize("seed", [0, 1])
def test_hyperformer_generates_adapters_near_the_identity(seed):
    """HyperFormer++: generated D, U fan-in scaled; biases and the norm's bias ~adapter_init_std
    around 0; the norm's gain centred on adapter_init_std."""
    _, out = wide("hyperformer", seed)
    a = STDS["adapter_init_std"]
    assert out["adapter_down"].shape == (WIDE_TASKS, 8, 2, WIDE.d_model, 32)
    assert_scale(out["adapter_down"], WIDE.d_model**-0.5, 0.45, "D")
    assert_scale(out["adapter_up"], 32**-0.5, 0.45, "U")
    for name in ("adapter_down_bias", "adapter_up_bias", "adapter_norm_weight", "adapter_norm_bias"):
        assert_scale(out[name], a, 0.45, name)
    for name in ("adapter_down_bias", "adapter_up_bias", "adapter_norm_bias"):
        assert abs(out[name].mean().item()) < 0.5 * a, name
    assert 0.5 * a < out["adapter_norm_weight"].mean().item() < 1.5 * a


# ---------------------------------------------------------------- config


INT_FIELDS = ("prompt_length", "bottleneck", "task_embedding_dim", "layer_embedding_dim", "projector_hidden_dim",
              "hyper_embedding_dim")
STD_FIELDS = ("global_prompt_init_std", "prompt_init_std", "input_prompt_init_std", "adapter_init_std")


@pytest.mark.parametrize("name", INT_FIELDS)
def test_sizes_must_be_positive(name):
    ConditioningConfig(**{name: 1})
    with pytest.raises(ValueError, match=rf"conditioning\.{name} must be >= 1, got 0"):
        ConditioningConfig(**{name: 0})


@pytest.mark.parametrize("name", STD_FIELDS)
def test_init_stds_must_be_positive(name):
    ConditioningConfig(**{name: 1e-6})
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match=rf"conditioning\.{name} must be > 0, got {bad}"):
            ConditioningConfig(**{name: bad})


def test_freezing_needs_something_to_train():
    ConditioningConfig(variant="none")
    ConditioningConfig(variant="prompt_tuning", freeze_backbone=True)
    message = r"^conditioning\.freeze_backbone with variant 'none' leaves nothing to train$"
    with pytest.raises(ValueError, match=message):
        ConditioningConfig(variant="none", freeze_backbone=True)


def test_defaults_are_the_documented_ones():
    cfg = ConditioningConfig()
    assert (cfg.variant, cfg.placement, cfg.freeze_backbone) == ("hyperprompt_global", "both", False)
    assert [getattr(cfg, f) for f in INT_FIELDS] == [16, 32, 32, 32, 64, 32]
    assert [getattr(cfg, f) for f in STD_FIELDS] == [1.0, 0.5, 0.5, 0.01]


@pytest.mark.parametrize("variant", ["none"] + ALL_VARIANTS)
def test_prompt_lengths_per_variant(variant):
    cfg = ConditioningConfig(variant=variant, prompt_length=7)
    kv = variant in ("kv_prompt", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global")
    assert cfg.kv_prompt_length == (7 if kv else 0)
    assert cfg.input_prompt_length == (7 if variant == "prompt_tuning" else 0)


def test_num_tasks_must_be_positive():
    build_conditioning(ConditioningConfig(variant="kv_prompt", **SMALL_CFG), SMALL, 1)
    for variant in ("none", "kv_prompt"):
        with pytest.raises(ValueError, match="num_tasks must be >= 1, got 0"):
            build_conditioning(ConditioningConfig(variant=variant), SMALL, 0)


# ---------------------------------------------------------------- dims and placement


def test_backbone_dims_of_a_t5_config():
    config = T5Config(d_model=24, num_heads=3, d_kv=5, num_layers=2, num_decoder_layers=4)
    assert BackboneDims.of(config) == BackboneDims(d_model=24, num_heads=3, d_kv=5, num_encoder_layers=2,
                                                   num_decoder_layers=4)


def test_conditioned_sides_follow_the_placement_encoder_first():
    assert conditioned_sides("both", SMALL) == (("encoder", 2), ("decoder", 3))
    assert conditioned_sides("encoder", SMALL) == (("encoder", 2),)
    assert conditioned_sides("decoder", SMALL) == (("decoder", 3),)


@pytest.mark.parametrize("placement", ["encoder", "decoder", "both"])
@pytest.mark.parametrize("variant", ["kv_prompt", "hyperprompt_share", "hyperprompt_sep", "hyperformer", "adapter"])
def test_placement_sizes_every_block_table(variant, placement):
    """The stacked block dimension of every variant has exactly the conditioned blocks."""
    cond = small(variant, placement)
    count = {"encoder": 2, "decoder": 3, "both": 5}[placement]
    out = cond.generator(torch.tensor([0, 3]))
    assert all(t.shape[:2] == (2, count) for t in out.values())
    served = cond(torch.tensor([3]))
    assert len(served.encoder or []) == (0 if placement == "decoder" else 2)
    assert len(served.decoder or []) == (0 if placement == "encoder" else 3)


def test_prompt_tuning_ignores_the_placement():
    for placement in ("encoder", "decoder", "both"):
        cond = small("prompt_tuning", placement)
        out = cond(torch.tensor([1]))
        assert cond.sides == () and out.encoder is None and out.decoder is None
        assert out.input_prompt.shape == (1, 3, SMALL.d_model)


# ---------------------------------------------------------------- which tasks are generated


def test_every_task_is_generated_only_when_the_batch_has_as_many_examples():
    cond = small("kv_prompt")
    tasks, rows = cond.tasks_to_generate(torch.tensor([3, 1, 3, 3]), sync_free=True)  # 4 examples, 4 tasks
    assert tasks.tolist() == [0, 1, 2, 3] and rows.tolist() == [3, 1, 3, 3] and rows.dtype == torch.long
    tasks, rows = cond.tasks_to_generate(torch.tensor([3, 1, 3]), sync_free=True)  # fewer: distinct ones
    assert tasks.tolist() == [1, 3] and rows.tolist() == [1, 0, 1]
    tasks, rows = cond.tasks_to_generate(torch.tensor([3, 1, 3, 3, 1]), sync_free=False)
    assert tasks.tolist() == [1, 3] and rows.tolist() == [1, 0, 1, 1, 0]


def test_a_cpu_batch_generates_its_distinct_tasks_only():
    """On the CPU (no device sync to avoid), even a batch with every task id generates each once."""
    cond = small("hyperprompt_share")
    seen = []
    cond.generator.register_forward_hook(lambda mod, args, out: seen.append(args[0].tolist()))
    cond(torch.tensor([2, 0, 2, 2, 0, 2]))
    assert seen == [[0, 2]]


# ---------------------------------------------------------------- precomputed conditioning


def assert_same_conditioning(a, b):
    assert (a.input_prompt is None) == (b.input_prompt is None)
    if a.input_prompt is not None:
        assert torch.equal(a.input_prompt, b.input_prompt)
    assert len(blocks(a)) == len(blocks(b)) and len(a.encoder or []) == len(b.encoder or [])
    for x, y in zip(blocks(a), blocks(b)):
        for s, t in zip(x.as_args(), y.as_args(), strict=True):
            assert (s is None) == (t is None)
            if s is not None:
                assert torch.equal(s, t)


@pytest.mark.parametrize("given", ["list", "tensor", "range"])
def test_precompute_keeps_the_distinct_requested_tasks(given):
    cond = small("hyperprompt_global")
    ids = {"list": [3, 1, 3], "tensor": torch.tensor([3, 1, 3], dtype=torch.int32), "range": range(1, 4, 2)}[given]
    pre = cond.precompute(ids)
    assert pre.task_ids.tolist() == [1, 3] and pre.task_ids.dtype == torch.long
    assert pre.num_tasks == NUM_TASKS and pre.sides == (("encoder", 2), ("decoder", 3))
    assert pre.key_prompt.shape[0] == 2 and not pre.key_prompt.requires_grad
    batch = torch.tensor([3, 1, 1, 3])
    with torch.no_grad():
        assert_same_conditioning(pre(batch), cond(batch))


def test_precompute_defaults_to_every_task():
    pre = small("adapter").precompute()
    assert pre.task_ids.tolist() == [0, 1, 2, 3]
    assert set(pre.fields) == {"adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias",
                               "adapter_norm_weight", "adapter_norm_bias"}


def test_precomputed_values_are_copies():
    """Training the generator afterwards does not move an exported model's prompts."""
    cond = small("kv_prompt")
    pre = cond.precompute()
    before = pre.key_prompt.clone()
    with torch.no_grad():
        cond.generator.prompts.add_(1.0)
    assert torch.equal(pre.key_prompt, before)


def test_precomputed_tasks_missing_are_named():
    pre = small("kv_prompt").precompute([1, 2])
    with pytest.raises(KeyError, match=r"tasks \[0, 3\] were not precomputed \(have \[1, 2\]\)"):
        pre(torch.tensor([3, 1, 0, 3, 2]))


def test_precomputed_file_format(tmp_path):
    pre = small("hyperprompt_sep").precompute([0, 2])
    path = tmp_path / "p.safetensors"
    pre.save(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["format"] == PrecomputedConditioning.FORMAT
    assert json.loads(meta["sides"]) == [["encoder", 2], ["decoder", 3]] and meta["num_tasks"] == str(NUM_TASKS)
    assert keys == {"task_ids", "key_prompt", "value_prompt"}
    loaded = PrecomputedConditioning.load(path, device="cpu")
    assert loaded.sides == pre.sides and loaded.num_tasks == NUM_TASKS and loaded.fields == pre.fields
    assert_same_conditioning(loaded(torch.tensor([2, 0])), pre(torch.tensor([2, 0])))
    # The buffers are state: .to() and state_dict carry them.
    assert set(loaded.state_dict()) == {"task_ids", "row_of_task", "key_prompt", "value_prompt"}


def test_loading_rejects_other_safetensors_files(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"not a precomputed conditioning file \(format None\)"):
        PrecomputedConditioning.load(path)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "something/1"})
    with pytest.raises(ValueError, match=r"format 'something/1'"):
        PrecomputedConditioning.load(path)


def test_precomputed_input_prompt_only():
    """Prompt-Tuning's precomputed form has no block conditioning, only the input prompt."""
    cond = small("prompt_tuning")
    pre = cond.precompute([2])
    out = pre(torch.tensor([2, 2]))
    assert out.encoder is None and out.decoder is None
    assert torch.equal(out.input_prompt, cond.generator.prompts[[2, 2]].detach())


def test_task_conditioning_owns_no_parameters_of_its_own():
    """Rule 1: every parameter is the generator's (the wrapper's output is safe under ZeRO-3)."""
    for variant in ALL_VARIANTS:
        cond = small(variant)
        assert isinstance(cond, TaskConditioning)
        assert all(name.startswith("generator.") for name, _ in cond.named_parameters())
        assert cond.num_tasks == NUM_TASKS


# ---------------------------------------------------------------- off the CPU (meta device)
# A meta tensor stands in for an accelerator's: it has a device that is not the CPU, shapes, no
# values. torch.unique has no meta kernel, as it needs the values (a host sync on a GPU).


def test_an_accelerator_batch_generates_every_task_without_unique():
    """Off the CPU, a batch with at least as many examples as tasks generates every task, on
    the batch's device (no torch.unique, so no host sync per step)."""
    with torch.device("meta"):
        cond = build_conditioning(ConditioningConfig(variant="hyperprompt_global", **SMALL_CFG), SMALL, NUM_TASKS)
    seen = []
    cond.generator.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    out = cond(torch.zeros(NUM_TASKS, dtype=torch.long, device="meta"))
    assert len(seen) == 1 and seen[0].device.type == "meta" and seen[0].shape == (NUM_TASKS,)
    assert out.encoder[0].key_prompt.shape == (NUM_TASKS, SMALL.num_heads, 3, SMALL.d_kv)


def test_precomputed_buffers_live_on_the_device_of_the_conditioning():
    """A model precomputes on its own device; the task bookkeeping follows the tensors there."""
    with torch.device("meta"):
        cond = build_conditioning(ConditioningConfig(variant="kv_prompt", **SMALL_CFG), SMALL, NUM_TASKS)
    pre = cond.precompute([2, 0])
    assert {buf.device.type for buf in pre.buffers()} == {"meta"}
    assert pre.key_prompt.shape == (2, 5, SMALL.num_heads, 3, SMALL.d_kv)


# ---------------------------------------------------------------- parameter counts


def expected_parameters(variant: str, dims: BackboneDims, cfg: ConditioningConfig, tasks: int) -> int:
    """Conditioning parameters per variant, from the math of docs/hyperprompt.md."""
    l, b, d = cfg.prompt_length, cfg.bottleneck, dims.d_model
    e, m = dims.num_heads * dims.d_kv, dims.num_encoder_layers + dims.num_decoder_layers
    t, k, z, h = cfg.hyper_embedding_dim, cfg.task_embedding_dim, cfg.layer_embedding_dim, cfg.projector_hidden_dim
    adapter = d * b + b + b * d + d + d + d                               # D, its bias, U, its bias, LN gain, LN bias
    if variant == "prompt_tuning":
        return tasks * l * d
    if variant == "kv_prompt":
        return tasks * 2 * m * dims.num_heads * l * dims.d_kv
    if variant == "hyperprompt_share":
        return tasks * l * d + 2 * m * (d * b + b * e)
    if variant == "hyperprompt_sep":
        return tasks * l * d + tasks * 2 * m * (d * b + b * e)
    if variant == "hyperprompt_global":                                     # P, I(t, m), H_k and H_v
        return tasks * l * d + tasks * k + m * z + (k + z) * h + h + h * t + t + 2 * t * b * (d + e)
    if variant == "hyperformer":                                            # I(t, m, s), linear generators with bias
        return tasks * k + m * z + 2 * z + (k + 2 * z) * h + h + h * t + t + (t + 1) * adapter
    assert variant == "adapter"
    return tasks * m * 2 * adapter


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_parameter_counts_are_the_documented_ones(variant):
    cfg = ConditioningConfig(variant=variant, **SMALL_CFG)
    cond = build_conditioning(cfg, SMALL, NUM_TASKS)
    assert sum(p.numel() for p in cond.parameters()) == expected_parameters(variant, SMALL, cfg, NUM_TASKS)
