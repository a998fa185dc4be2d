"""The conditioning modules alone (no backbone): the math of every variant against a direct,
per-task per-block transcription of the spec, distinct-task generation, precomputation, config."""

import pytest
import torch

from hp_deepspeed.config import ConfigError, from_dict
from hp_deepspeed.model.conditioning import (
    BackboneDims,
    ConditioningConfig,
    PrecomputedConditioning,
    _examples_output,
    build_conditioning,
)

DIMS = BackboneDims(d_model=16, num_heads=2, d_kv=4, num_encoder_layers=2, num_decoder_layers=3)
CFG = dict(prompt_length=3, bottleneck=5, task_embedding_dim=6, layer_embedding_dim=7,
           projector_hidden_dim=9, hyper_embedding_dim=4)
NUM_TASKS = 4
BLOCK_VARIANTS = ["kv_prompt", "hyperprompt_share", "hyperprompt_sep", "hyperprompt_global", "hyperformer", "adapter"]
ADAPTER_VARIANTS = ("hyperformer", "adapter")
ADAPTER_FIELDS = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias", "adapter_norm_weight",
                  "adapter_norm_bias")
ALL_VARIANTS = ["prompt_tuning"] + BLOCK_VARIANTS


def make(variant: str, placement: str = "both"):
    torch.manual_seed(0)
    return build_conditioning(ConditioningConfig(variant=variant, placement=placement, **CFG), DIMS, NUM_TASKS)


def blocks(out):
    """All blocks' LayerConditioning, encoder first (the generators' block order)."""
    return (out.encoder or []) + (out.decoder or [])


def task_layer_embedding(gen, t: int, m: int, s: int | None = None) -> torch.Tensor:
    """I(t, m) = h_t([k_t; z_m]) (or HyperFormer++'s I(t, m, s) = h_t([k_t; z_m; y_s])) written out."""
    emb = gen.task_layer_embedding
    parts = [emb.task_embedding[t], emb.block_embedding[m]] + ([] if s is None else [emb.site_embedding[s]])
    x = torch.cat(parts)
    return torch.relu(x @ emb.projector_in + emb.projector_in_bias) @ emb.projector_out + emb.projector_out_bias


def local_hypernet(prompt, down, up):
    """h(P) = U(ReLU(D(P))) reshaped to [heads, l, d_kv]."""
    out = torch.relu(prompt @ down) @ up                                  # [l, heads*d_kv]
    return out.view(prompt.shape[0], DIMS.num_heads, DIMS.d_kv).transpose(0, 1)


def reference_block(variant: str, gen, t: int, m: int) -> dict[str, torch.Tensor]:
    """The spec's formula for task t, block m, with every weight materialised."""
    if variant == "kv_prompt":
        return {"key_prompt": gen.prompts[t, 0, m], "value_prompt": gen.prompts[t, 1, m]}
    if variant == "hyperformer":  # linear generators with biases, per site (self-attention, FFN)
        out = {}
        for name in ADAPTER_FIELDS:
            w, bias = getattr(gen, f"{name}_generator"), getattr(gen, f"{name}_generator_bias")
            out[name] = torch.stack([torch.tensordot(task_layer_embedding(gen, t, m, s), w, dims=1) + bias
                                     for s in range(2)])
        return out
    if variant == "adapter":
        return {name: getattr(gen, name)[t, m] for name in ADAPTER_FIELDS}
    prompt = gen.global_prompts[t]
    out = {}
    for k, name in enumerate(("key_prompt", "value_prompt")):
        if variant == "hyperprompt_share":
            down, up = gen.down[k, m], gen.up[k, m]
        elif variant == "hyperprompt_sep":
            down, up = gen.down[t, k, m], gen.up[t, k, m]
        else:  # global: H_k / H_v generate D and U from I(t, m)
            i = task_layer_embedding(gen, t, m)
            down = torch.einsum("j,jdb->db", i, gen.down_generator[k])
            up = torch.einsum("j,jbe->be", i, gen.up_generator[k])
        out[name] = local_hypernet(prompt, down, up)
    return out


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
def test_block_conditioning_matches_the_spec_formula(variant):
    cond = make(variant)
    task_ids = torch.tensor([3, 1, 3, 0])
    with torch.no_grad():
        out = cond(task_ids)
        layers = blocks(out)
        assert len(out.encoder) == DIMS.num_encoder_layers and len(out.decoder) == DIMS.num_decoder_layers
        for m, layer in enumerate(layers):
            for b, t in enumerate(task_ids.tolist()):
                for name, expected in reference_block(variant, cond.generator, t, m).items():
                    torch.testing.assert_close(getattr(layer, name)[b], expected, rtol=1e-5, atol=1e-6)
    if variant in ADAPTER_VARIANTS:
        assert layers[0].adapter_down.shape == (4, 2, DIMS.d_model, CFG["bottleneck"])
        assert layers[0].key_prompt is None
    else:
        assert layers[0].key_prompt.shape == (4, DIMS.num_heads, CFG["prompt_length"], DIMS.d_kv)
        assert layers[0].adapter_down is None
    assert out.input_prompt is None


def test_prompt_tuning_is_a_per_task_input_prompt():
    cond = make("prompt_tuning")
    out = cond(torch.tensor([2, 0, 2]))
    assert out.encoder is None and out.decoder is None
    assert out.input_prompt.shape == (3, CFG["prompt_length"], DIMS.d_model)
    torch.testing.assert_close(out.input_prompt[0], cond.generator.prompts[2])
    torch.testing.assert_close(out.input_prompt[1], cond.generator.prompts[0])


@pytest.mark.parametrize("placement", ["encoder", "decoder"])
def test_placement_conditions_one_stack_and_sizes_the_block_embedding(placement):
    cond = make("hyperprompt_global", placement)
    out = cond(torch.tensor([0, 1]))
    other = "decoder" if placement == "encoder" else "encoder"
    assert getattr(out, other) is None
    count = DIMS.num_encoder_layers if placement == "encoder" else DIMS.num_decoder_layers
    assert len(getattr(out, placement)) == count
    assert cond.generator.task_layer_embedding.block_embedding.shape[0] == count


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_generator_runs_on_distinct_tasks_only(variant):
    cond = make(variant)
    seen = []
    cond.generator.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    task_ids = torch.tensor([2, 2, 0, 2, 0, 0, 2, 2])
    cond(task_ids)
    assert len(seen) == 1 and seen[0].tolist() == [0, 2]
    # Every generated tensor has one row per distinct task before the gather.
    per_task = cond.generator(seen[0])
    assert all(t.shape[0] == 2 for t in per_task.values())


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_generating_every_task_equals_distinct_tasks(variant):
    """The GPU path without torch.unique gives the same conditioning and gradients."""
    cond = make(variant)
    task_ids = torch.tensor([2, 2, 0, 2, 0, 0, 2, 2])
    results = []
    for sync_free in (False, True):
        cond.zero_grad(set_to_none=True)
        tasks, rows = cond.tasks_to_generate(task_ids, sync_free)
        out = _examples_output(cond.generator(tasks), rows, cond.sides)
        flat = [t for layers in (out.encoder or []) + (out.decoder or []) for t in layers.as_args() if t is not None]
        flat += [out.input_prompt] if out.input_prompt is not None else []
        sum(t.square().sum() for t in flat).backward()
        results.append((tasks.numel(), flat, [p.grad.clone() for p in cond.parameters()]))
    (n_distinct, distinct, grads), (n_all, every, grads_all) = results
    assert n_distinct == 2 and n_all == cond.num_tasks
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(distinct, every))
    # Gradients are summed over more (zero) rows: equal up to fp32 summation order.
    assert all((a - b).abs().max() <= 1e-6 * a.abs().max() for a, b in zip(grads, grads_all))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_precomputed_conditioning_equals_generation_and_survives_save_load(variant, tmp_path):
    cond = make(variant)
    task_ids = torch.tensor([1, 3, 1, 0, 2])
    with torch.no_grad():
        live = cond(task_ids)
    pre = cond.precompute()
    path = tmp_path / "cond.safetensors"
    pre.save(path)
    loaded = PrecomputedConditioning.load(path)
    assert not any(True for _ in loaded.parameters())  # constants only, no hypernetwork
    for module in (pre, loaded):
        served = module(task_ids)
        if live.input_prompt is not None:
            torch.testing.assert_close(served.input_prompt, live.input_prompt, rtol=0, atol=0)
        for a, b in zip(blocks(live), blocks(served), strict=True):
            for x, y in zip(a.as_args(), b.as_args(), strict=True):
                assert (x is None) == (y is None)
                if x is not None:
                    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_precomputed_subset_rejects_other_tasks():
    pre = make("hyperprompt_share").precompute([2])
    pre(torch.tensor([2, 2]))
    with pytest.raises(KeyError, match=r"\[1\]"):
        pre(torch.tensor([2, 1]))


def test_config_is_strict_and_validated():
    cfg = from_dict(ConditioningConfig, {"variant": "hyperprompt_sep", "placement": "decoder", "bottleneck": 8})
    assert cfg.variant == "hyperprompt_sep" and cfg.kv_prompt_length == cfg.prompt_length
    with pytest.raises(ConfigError, match="variant"):
        from_dict(ConditioningConfig, {"variant": "hyperprompt"})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(ConditioningConfig, {"bottle_neck": 8})
    with pytest.raises(ValueError, match="prompt_length"):
        ConditioningConfig(prompt_length=0)
    with pytest.raises(ValueError, match="nothing to train"):
        ConditioningConfig(variant="none", freeze_backbone=True)
    assert ConditioningConfig(variant="hyperformer").kv_prompt_length == 0
    assert build_conditioning(ConditioningConfig(variant="none"), DIMS, NUM_TASKS) is None


@pytest.mark.parametrize("variant", ["none"] + ALL_VARIANTS)
def test_config_prompt_lengths_are_what_the_modules_produce(variant):
    """``kv_prompt_length`` / ``input_prompt_length`` (what the planner and FLOP counts read) agree
    with the tensors each variant's module really hands the backbone."""
    cfg = ConditioningConfig(variant=variant, **CFG)
    module = build_conditioning(cfg, DIMS, NUM_TASKS)
    out = module(torch.tensor([0, 2])) if module is not None else None
    key_prompts = [c.key_prompt for c in blocks(out) if c.key_prompt is not None] if out else []
    assert {k.shape[2] for k in key_prompts} == ({cfg.kv_prompt_length} if cfg.kv_prompt_length else set())
    if cfg.kv_prompt_length:  # every block of both stacks carries them
        assert len(key_prompts) == DIMS.num_encoder_layers + DIMS.num_decoder_layers
    input_prompt = out.input_prompt if out else None
    assert (0 if input_prompt is None else input_prompt.shape[1]) == cfg.input_prompt_length
