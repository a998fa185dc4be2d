"""Tiny random T5 checkpoints written by transformers itself, for offline tests.

Tests never reach a model hub, so the checkpoints the loader is tested on are made here by
``T5ForConditionalGeneration.save_pretrained`` (or, for the legacy ``.bin`` layouts that
transformers 5 no longer writes, by ``torch.save`` of its state dict, which is what those files
are). Every parameter is perturbed away from HF's initialisation (layer-norm gains away from
1, a large relative-bias table, a separate random ``lm_head`` for v1.1) so that a loader or a
model that drops or swaps a tensor produces visibly different logits. Deterministic per seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from hp_deepspeed.model.t5_config import T5Config

CheckpointFormat = Literal["safetensors", "sharded", "bin", "sharded_bin"]


def hf_config(config: T5Config):
    """The transformers ``T5Config`` equal to ours."""
    from transformers import T5Config as HFT5Config

    data = config.to_hf_dict()
    # transformers 5 infers the output scaling from tie_word_embeddings and always ties on
    # construction; v1.1's separate lm_head is restored in make_hf_model.
    data.pop("scale_decoder_outputs")
    for derived in ("dense_act_fn", "is_gated_act", "architectures"):
        data.pop(derived)
    return HFT5Config(**data)


def make_hf_model(config: T5Config, seed: int = 0):
    """A randomly initialised transformers ``T5ForConditionalGeneration`` (eval mode, fp32)."""
    from transformers import T5ForConditionalGeneration

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(hf_config(config))
    if not config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif "relative_attention_bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
    return model.eval()


def make_tiny_hf_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny-v1_0",
    seed: int = 0,
    fmt: CheckpointFormat = "safetensors",
) -> Path:
    """Write a tiny random HF checkpoint folder in the given layout; returns the folder."""
    out_dir = Path(out_dir)
    model = make_hf_model(T5Config.from_pretrained(preset), seed)
    if fmt in ("safetensors", "sharded"):
        # ~10 KB shards split the tiny model into several files with an index.
        model.save_pretrained(out_dir, max_shard_size=10_000 if fmt == "sharded" else "50GB")
        if fmt == "sharded" and not (out_dir / "model.safetensors.index.json").is_file():
            raise RuntimeError("transformers did not shard the tiny checkpoint; lower max_shard_size")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    # Legacy checkpoints hold the shared-embedding aliases and a tied lm_head too.
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if fmt == "bin":
        torch.save(state, out_dir / "pytorch_model.bin")
        return out_dir
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file_name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, out_dir / file_name)
        weight_map.update({n: file_name for n in part})
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out_dir
