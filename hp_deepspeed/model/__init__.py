"""The T5 backbone: architecture config, model, HF checkpoint I/O, greedy generation, builder."""

from hp_deepspeed.model.builder import ModelConfig, build_backbone, resolve_t5_config
from hp_deepspeed.model.generation import greedy_generate
from hp_deepspeed.model.hf_checkpoint import WeightsError, CheckpointReader, load_hf_weights, save_hf_checkpoint
from hp_deepspeed.model.layer_conditioning import ConditioningOutput, LayerConditioning, apply_adapter
from hp_deepspeed.model.t5 import DecoderCache, T5Model, T5Output
from hp_deepspeed.model.t5_config import PRESETS, T5Config

__all__ = [
    "WeightsError",
    "CheckpointReader",
    "ConditioningOutput",
    "DecoderCache",
    "LayerConditioning",
    "ModelConfig",
    "PRESETS",
    "T5Config",
    "T5Model",
    "T5Output",
    "apply_adapter",
    "build_backbone",
    "greedy_generate",
    "load_hf_weights",
    "resolve_t5_config",
    "save_hf_checkpoint",
]
