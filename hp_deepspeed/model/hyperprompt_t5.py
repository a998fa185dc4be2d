"""The model the trainer trains: the T5 backbone plus its task conditioning.

``HyperPromptT5.forward`` calls the conditioning module once (it generates one set of prompts
or adapters per distinct task of the batch and gathers them to the examples), then the backbone
with that ``ConditioningOutput``. The wrapper owns no parameters of its own: under ZeRO-3 every
parameter lives in a submodule that is called through its own forward, so DeepSpeed's module
hooks gather and release it (see hp_deepspeed/model/conditioning.py).

With ``variant: none`` there is no conditioning module and the backbone is called with
``conditioning=None``: the model *is* the plain multi-task T5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hp_deepspeed.model.builder import DTYPES, ModelConfig, build_backbone, construction_site, zero_stage
from hp_deepspeed.model.conditioning import (
    BackboneDims,
    ConditioningConfig,
    PrecomputedConditioning,
    UNCONDITIONED_VARIANTS,
    TaskConditioning,
    build_conditioning,
)
from hp_deepspeed.model.generation import greedy_generate
from hp_deepspeed.model.layer_conditioning import ConditioningOutput
from hp_deepspeed.model.t5 import Segments, T5Model, T5Output
from hp_deepspeed.model.t5_config import T5Config


class HyperPromptT5(nn.Module):
    """A T5 backbone conditioned on the task id of each example."""

    def __init__(
        self,
        backbone: T5Model,
        conditioning: TaskConditioning | PrecomputedConditioning | None,
        kv_prompt_length: int = 0,
    ):
        """``kv_prompt_length``: key/value prompt slots each conditioned self-attention sees
        (``ConditioningConfig.kv_prompt_length``), for FLOP accounting."""
        super().__init__()
        self.backbone = backbone
        self.conditioning = conditioning
        self.kv_prompt_length = kv_prompt_length

    @property
    def config(self) -> T5Config:
        return self.backbone.config

    def zero3_leaf_blocks(self) -> list[nn.Module]:
        """See ``T5Model.zero3_leaf_blocks``; the conditioning modules keep per-module hooks."""
        return self.backbone.zero3_leaf_blocks()

    def condition(self, task_ids: Tensor) -> ConditioningOutput | None:
        """The conditioning of a batch (``None`` for the plain backbone)."""
        return None if self.conditioning is None else self.conditioning(task_ids)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        input_segment_ids: Tensor | None = None,
        target_segment_ids: Tensor | None = None,
        segment_task_ids: Tensor | None = None,
    ) -> T5Output:
        """A batch of examples (``task_ids`` [B]), or of packed rows (``data.packing``: the
        ``*segment_ids`` [B, length], 0 on padding, and ``segment_task_ids`` [B, segments], -1
        for a row's empty slots), whose per-example outputs are then per segment."""
        segments = None
        if segment_task_ids is not None:
            if input_segment_ids is None or target_segment_ids is None:
                raise ValueError("packed rows need input_segment_ids and target_segment_ids with segment_task_ids")
            segments = Segments(input_segment_ids, target_segment_ids, segment_task_ids.shape[1])
            # One conditioning per segment; an empty slot takes task 0's, which no token sees.
            task_ids = segment_task_ids.flatten().clamp(min=0)
        if task_ids is None and self.conditioning is not None:
            raise ValueError("HyperPromptT5.forward needs task_ids when the model is task-conditioned")
        return self.backbone(
            input_ids, attention_mask, decoder_input_ids=decoder_input_ids, labels=labels,
            decoder_attention_mask=decoder_attention_mask,
            conditioning=None if task_ids is None or self.conditioning is None else self.condition(task_ids),
            segments=segments,
        )

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None, task_ids: Tensor | None, max_new_tokens: int = 32
    ) -> Tensor:
        """Greedy decoding (see ``greedy_generate``); the conditioning is computed once, up front."""
        return greedy_generate(
            self.backbone, input_ids, attention_mask, max_new_tokens,
            conditioning=None if task_ids is None else self.condition(task_ids),
        )

    def precompute(self, task_ids=None) -> PrecomputedConditioning:
        """The conditioning of ``task_ids`` (default all tasks) as constants; see TaskConditioning."""
        if not isinstance(self.conditioning, TaskConditioning):
            raise ValueError("only a hypernetwork/table conditioning module can be precomputed")
        return self.conditioning.precompute(task_ids)

    def with_conditioning(self, conditioning: PrecomputedConditioning) -> "HyperPromptT5":
        """The same backbone served with ``conditioning`` (e.g. ``self.precompute()``), moved to
        the backbone's device (a loaded one comes from the CPU)."""
        device = next(self.backbone.parameters()).device
        return HyperPromptT5(self.backbone, conditioning.to(device), kv_prompt_length=self.kv_prompt_length)


def build_model(
    model_cfg: ModelConfig,
    cond_cfg: ConditioningConfig,
    num_tasks: int,
    ds_config: dict[str, Any] | str | None = None,
    device: torch.device | str = "cpu",
) -> HyperPromptT5:
    """Build the backbone (and load its weights) and the conditioning module.

    With a ZeRO stage-3 ``ds_config`` both are created inside ``deepspeed.zero.Init``, so no rank
    ever holds a full copy (every rank must call this). ``device="meta"`` builds shapes only (the
    parameter report). The conditioning is seeded with ``model_cfg.seed`` on its own, so its
    initialisation does not depend on how the backbone was built or loaded.
    """
    backbone = build_backbone(model_cfg, ds_config=ds_config, device=device)
    if cond_cfg.freeze_backbone:  # ConditioningConfig refuses it when there is nothing else to train
        backbone.requires_grad_(False)
    dims = BackboneDims.of(backbone.config)
    torch.manual_seed(model_cfg.seed)
    if cond_cfg.variant in UNCONDITIONED_VARIANTS:  # nothing to build: no zero.Init to enter
        conditioning = None
    else:
        with construction_site(ds_config, device):
            conditioning = build_conditioning(cond_cfg, dims, num_tasks)
        if str(device) != "meta" and zero_stage(ds_config) != 3:
            conditioning = conditioning.to(device=device, dtype=DTYPES[model_cfg.dtype])
    return HyperPromptT5(backbone, conditioning, kv_prompt_length=cond_cfg.kv_prompt_length)
