"""``hp-deepspeed plan``: will a T5 + HyperPrompt run fit, and with which settings?

Before a multi-node job is queued this answers, for one model and one cluster shape:

* how much GPU memory per GPU and CPU memory per node the ZeRO-3 *model states* (bf16
  parameters, gradients, fp32 master weights and Adam moments) need without offload, with the
  optimizer offloaded to the CPU, and with optimizer and parameters offloaded. These numbers are
  DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs``) fed with the parameter
  count of the real model built on the meta device -- backbone *and* task conditioning;
* how much activation memory one micro-batch needs at the given input/target lengths, with and
  without per-block activation checkpointing (``activation_bytes`` below derives it term by
  term from what our T5 saves for backward);
* the largest micro-batch that fits in each setting within a safety margin, and a suggestion:
  the cheapest offload that fits CPU memory, and checkpointing only when it is needed.

Everything is an estimate for planning: measure the first steps of a real run (the trainer logs
``mem_peak_gib``) before scaling out. All "GB" in this tool are GiB (2**30 bytes), the unit
DeepSpeed's estimator prints.

    hp-deepspeed plan --preset google/t5-v1_1-xxl --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 \\
        --cpu-mem-gb 1024 --input-len 512 --target-len 128
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30

# ZeRO-3 offload settings in the order the suggestion prefers them: offload trades GPU memory
# for PCIe traffic and CPU Adam time, so it is only worth it when nothing cheaper fits.
# Values: (offload_optimizer to CPU, offload_param to CPU), DeepSpeed's cpu_offload and
# cpu_offload_params arguments.
OFFLOAD_MODES: dict[str, tuple[bool, bool]] = {
    "none": (False, False),
    "cpu_optimizer": (True, False),
    "cpu_optimizer_params": (True, True),
}
# The ds_configs/ file that implements each mode: what the suggestion tells the user to pass
# as training.ds_config (tests/tools checks each file's offload sections against its mode).
OFFLOAD_DS_CONFIG = {
    "none": "ds_configs/zero3_bf16.json",
    "cpu_optimizer": "ds_configs/zero3_offload_optimizer_cpu.json",
    "cpu_optimizer_params": "ds_configs/zero3_offload_cpu.json",
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    """Memory of one GPU as sold (80 for an H100 80GB); the margin covers the usable shortfall."""
    cpu_mem_gib: float
    """CPU RAM of one node."""

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    input_len: int
    """Padded encoder length (tokens per example, before any soft input prompt)."""
    target_len: int
    """Padded decoder length."""
    dropout: float
    """Dropout rate of the backbone; > 0 stores a one-byte mask per dropped element."""


@dataclass(frozen=True)
class Margins:
    gpu_fraction: float = 0.10
    """Share of each GPU kept free for allocator fragmentation and estimation error."""
    gpu_reserved_gib: float = 3.0
    """Taken off each GPU before anything else: CUDA context, NCCL buffers and cuBLAS workspaces
    (typically 1.5 to 3 GiB on H100 with NCCL over InfiniBand)."""
    cpu_fraction: float = 0.10
    """Share of node RAM kept for the OS, data loader workers and page cache."""


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about the model: counts from the meta model, dims."""

    name: str
    config: Any
    """hp_deepspeed.model.t5_config.T5Config"""
    variant: str
    """Conditioning variant (ConditioningConfig.variant); ``none`` for the plain backbone."""
    num_tasks: int
    backbone_params: int
    conditioning_params: int
    largest_layer_params: int
    """Parameters held directly by the largest single module (what ZeRO-3 gathers at once)."""
    largest_layer: str
    """Qualified name of that module, e.g. ``shared`` or ``lm_head``."""
    kv_prompt_len: int
    """Key/value prompt slots prepended in each conditioned block's self-attention."""
    kv_prompt_sides: tuple[str, ...]
    """Stacks whose blocks carry key/value prompts (``encoder``, ``decoder``)."""
    input_prompt_len: int
    """Soft-prompt tokens prepended to the encoder input (``prompt_tuning``)."""
    conditioning_saved_bytes_per_task: int = 0
    """What the conditioning generator saves for backward per distinct task of a micro-batch."""
    conditioning_saved_bytes_fixed: int = 0
    """What it saves whatever the number of tasks (e.g. a weight einsum lays out for its bmm)."""
    conditioning_bytes_per_example: int = 0
    """The generated tensors gathered to one example (prompts or adapter weights of all blocks)."""
    conditioning_backward_bytes_fixed: int = 0
    """The most the generator holds during its backward (its saved tensors, the gradients of its
    outputs and intermediates; not its parameters' gradients), whatever the number of tasks ..."""
    conditioning_backward_bytes_per_task: int = 0
    """... and per distinct task of a micro-batch."""

    @property
    def total_params(self) -> int:
        return self.backbone_params + self.conditioning_params


def count_params(module) -> tuple[int, int, str]:
    """(total parameters, parameters of the largest module, that module's name).

    The same quantities as DeepSpeed's ``model_to_params`` but safe on the meta device: that
    function deduplicates tied weights by ``data_ptr()``, which is 0 for every meta tensor, so
    it would count a meta model as one tensor. ``parameters()`` already yields a tied weight
    (``shared``/``lm_head`` of T5 v1.0) once, by identity.
    """
    total = sum(p.numel() for p in module.parameters())
    largest, largest_name = 0, ""
    for name, sub in module.named_modules():
        direct = sum(p.numel() for p in sub.parameters(recurse=False))
        if direct > largest:
            largest, largest_name = direct, name
    return total, largest, largest_name


def load_model_spec(name_or_path: str, variant: str = "hyperprompt_global", num_tasks: int = 8,
                    prompt_length: int | None = None, placement: str = "both") -> ModelSpec:
    """Build the trainer's model (``hyperprompt_t5.build_model``) on the meta device and count it.

    ``name_or_path``: a preset name (``t5-small`` ... ``google/t5-v1_1-xxl``) or a local folder
    or config.json. Nothing is allocated and no weights are read, so T5-XXL takes a second.
    The totals are those of ``hp_deepspeed.model.param_report`` (tests/tools checks it); the
    model is counted here rather than through it because the largest layer and the conditioning
    module's activations need the model itself.
    """
    from hp_deepspeed.model.builder import ModelConfig
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model

    cond_kwargs: dict[str, Any] = {"variant": variant, "placement": placement}
    if prompt_length is not None:
        cond_kwargs["prompt_length"] = prompt_length
    cond_cfg = ConditioningConfig(**cond_kwargs)
    model = build_model(ModelConfig(name_or_path=str(name_or_path), load_weights=False), cond_cfg, num_tasks,
                        device="meta")
    config, conditioning = model.config, model.conditioning
    backbone_total, largest, largest_name = count_params(model.backbone)
    cond_total, cond_largest, cond_largest_name = (0, 0, "")
    if conditioning is not None:
        cond_total, cond_largest, cond_largest_name = count_params(conditioning)
    if cond_largest > largest:
        largest, largest_name = cond_largest, f"conditioning.{cond_largest_name}"

    saved_fixed, saved_per_task, per_example = (0, 0, 0)
    backward_fixed, backward_per_task = (0, 0)
    if conditioning is not None:
        saved_fixed, saved_per_task, per_example = _conditioning_activation_bytes(conditioning, num_tasks)
        backward_fixed, backward_per_task = _conditioning_backward_bytes(conditioning, num_tasks)

    # The stacks the built conditioning module really conditions, when it conditions them with
    # key/value prompts (its other block-level outputs are FFN adapters).
    kv_sides = tuple(side for side, _ in conditioning.sides) if cond_cfg.kv_prompt_length else ()
    return ModelSpec(
        name=str(name_or_path), config=config, variant=variant, num_tasks=num_tasks,
        backbone_params=backbone_total, conditioning_params=cond_total,
        largest_layer_params=largest, largest_layer=largest_name,
        kv_prompt_len=cond_cfg.kv_prompt_length, kv_prompt_sides=kv_sides,
        input_prompt_len=cond_cfg.input_prompt_length,
        conditioning_saved_bytes_per_task=saved_per_task, conditioning_saved_bytes_fixed=saved_fixed,
        conditioning_bytes_per_example=per_example,
        conditioning_backward_bytes_fixed=backward_fixed, conditioning_backward_bytes_per_task=backward_per_task,
    )


def _conditioning_activation_bytes(conditioning, num_tasks: int) -> tuple[int, int, int]:
    """(bytes saved for backward whatever the tasks, bytes saved per distinct task, bytes of the
    outputs per example), in bf16.

    Measured rather than derived: the generator (hypernetworks, task embeddings ...) runs on the
    meta device under a saved-tensors hook, which sees exactly what autograd keeps, whatever the
    variant. Views are counted once, by base. It runs twice, for one task and for all
    ``num_tasks``: the [tasks, ...]-shaped intermediates scale with the distinct tasks of a
    micro-batch, but not everything saved is [tasks, ...]-shaped: the HyperPrompt hypernetworks'
    einsums save a bmm-ready copy of a weight once, whatever the tasks (16 MiB for T5-XXL's
    HyperPrompt-Global). Dividing the all-task count by the tasks, as this did before, spread that
    copy over the tasks and under-counted a micro-batch of fewer distinct tasks than ``num_tasks``
    by up to (1 - 1/tasks) of it (found against a measured CPU run, tests/tools/test_plan.py). The
    two runs give the fixed part and the slope; with one task everything counts as per-task.
    """
    import torch

    generator = conditioning.generator.to(torch.bfloat16)

    def saved_by(tasks: int) -> tuple[int, Any]:
        saved: dict[int, int] = {}

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if not isinstance(base, torch.nn.Parameter):
                saved[id(base)] = base.numel() * base.element_size()
            return tensor

        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = generator(torch.arange(tasks))
        return sum(saved.values()), outputs

    all_tasks, outputs = saved_by(num_tasks)
    per_example = sum(t.numel() * t.element_size() for t in outputs.values()) // num_tasks
    if num_tasks == 1:
        return 0, all_tasks, per_example
    per_task = (all_tasks - saved_by(1)[0]) // (num_tasks - 1)
    return all_tasks - num_tasks * per_task, per_task, per_example


def _conditioning_backward_bytes(conditioning, num_tasks: int) -> tuple[int, int]:
    """(fixed, per distinct task) of the most the generator holds at once during its backward:
    its saved tensors and outputs, their gradients and the backward's own temporaries, not its
    parameters' gradients (model states).

    Measured on the meta device like the saved bytes: a dispatch mode records when each storage
    an op creates is allocated and freed (a meta storage's Python object lives exactly as long as
    the storage, so a weak reference says when), and the running maximum over the backward is
    taken. The gradients of the outputs, seeded with ones, stand in for the [tasks, ...] gradient
    the model hands the generator. Run for one task and for all, as ``_conditioning_activation_bytes``.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    generator = conditioning.generator.to(torch.bfloat16)
    params = [p for p in generator.parameters() if p.requires_grad]

    class Storages(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.exclude = {id(p.untyped_storage()) for p in generator.parameters()}
            self.live: dict[int, int] = {}  # id(storage) -> allocation number
            self.events: list[tuple[int, int]] = []  # (allocation number, +bytes or -bytes)
            self.ignored: set[int] = set()  # allocations that are parameter gradients

        def _free(self, key: int, uid: int, nbytes: int) -> None:
            if self.live.get(key) == uid:
                del self.live[key]
                self.events.append((uid, -nbytes))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key, nbytes = id(storage), storage.nbytes()
                    if key not in self.exclude and key not in self.live:  # not a view or a parameter
                        uid = len(self.events)
                        self.live[key] = uid
                        self.events.append((uid, nbytes))
                        weakref.finalize(storage, self._free, key, uid, nbytes)
            return out

        def release(self, tensor) -> None:
            """Count ``tensor``'s storage as freed from now on (the model does not keep it)."""
            key = id(tensor.untyped_storage())
            uid = self.live.pop(key, None)
            if uid is not None:
                self.events.append((uid, -tensor.untyped_storage().nbytes()))

        def drop_gradient(self, param) -> None:
            uid = self.live.get(id(param.grad.untyped_storage()))
            if uid is not None:
                self.ignored.add(uid)
            param.grad = None

        def peak_after(self, start: int) -> int:
            live = sum(n for uid, n in self.events[:start] if uid not in self.ignored)
            peak = live
            for uid, n in self.events[start:]:
                if uid not in self.ignored:
                    live += n
                    peak = max(peak, live)
            return peak

    def peak_of(tasks: int) -> int:
        tracker = Storages()
        handles = [p.register_post_accumulate_grad_hook(tracker.drop_gradient) for p in params]
        try:
            with torch.device("meta"), tracker:
                outputs = [t for t in generator(torch.arange(tasks)).values() if t.requires_grad]
                grads = [torch.ones_like(t) for t in outputs]
                # The model gathers the outputs to its examples and lets them go; only their
                # gradient reaches the generator's backward.
                for tensor in outputs:
                    tracker.release(tensor)
                start = len(tracker.events)
                torch.autograd.backward(outputs, grads)
                del outputs, grads
        finally:
            for handle in handles:
                handle.remove()
        return tracker.peak_after(start)

    all_tasks = peak_of(num_tasks)
    if num_tasks == 1:
        return 0, all_tasks
    per_task = (all_tasks - peak_of(1)) // (num_tasks - 1)
    return all_tasks - num_tasks * per_task, per_task


# ---------------------------------------------------------------------------------------------
# Model states: DeepSpeed's estimator
# ---------------------------------------------------------------------------------------------
def model_states_bytes(total_params: int, largest_layer_params: int, cluster: Cluster, offload: str,
                       zero_init: bool = True, buffer_factor: float = 1.5) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) for ZeRO-3 model states, from DeepSpeed.

    ``zero_init=True`` because the trainer builds the model inside ``deepspeed.zero.Init``
    (hp_deepspeed/model/builder.py), so no rank ever holds the full model in CPU memory.
    ``buffer_factor`` is DeepSpeed's own 1.5 head-room on the CPU side. The estimator assumes
    every parameter is trained (Adam states for all); with ``conditioning.freeze_backbone``
    the optimizer part is smaller and these numbers are an upper bound.
    """
    # Importing DeepSpeed logs its accelerator detection to stdout, which would corrupt --json.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu_offload, cpu_offload_params = OFFLOAD_MODES[offload]
    cpu_mem, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        total_params=total_params, largest_layer_params=largest_layer_params,
        num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes,
        cpu_offload=cpu_offload, cpu_offload_params=cpu_offload_params,
        zero_init=zero_init, additional_buffer_factor=buffer_factor,
    )
    return int(gpu_mem), int(cpu_mem)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------
BF16 = 2  # bytes per activation element: the DeepSpeed configs train in bf16
FP32 = 4
MASK = 1  # the fused CUDA dropout kernel keeps its mask as bool


def _norm_internal_bytes(tokens: int, d_model: int) -> int:
    """What T5LayerNorm saves internally (its statistics are fp32): ``rms_norm`` of
    ``hidden.float()`` saves that one fp32 copy of the input and the fp32 rsqrt per token (the
    fused CUDA kernel and the CPU's decomposition alike), and ``weight * normed.to(bf16)`` saves
    the bf16 ``normed``."""
    return tokens * d_model * (FP32 + BF16) + tokens * FP32


def _norm_bytes(tokens: int, d_model: int) -> int:
    """A block's pre-norm including its bf16 output, which the projections after it save."""
    return _norm_internal_bytes(tokens, d_model) + tokens * d_model * BF16


def _attention_bytes(q_tokens: int, kv_tokens: int, inner: int, heads: int) -> int:
    """One ``F.scaled_dot_product_attention`` sub-layer, q/k/v and o projections.

    SDPA with a float bias on GPU runs the memory-efficient kernel, which saves q, k, v, its
    output and the fp32 log-sum-exp per query and head -- no [len, len] probabilities, and its
    dropout regenerates its mask from the RNG seed. The output is laid out so that the
    ``transpose(1, 2).reshape`` before ``o`` is a view: ``o`` saves the same tensor.
    For cross-attention k and v are projected from the encoder output, which is counted once per
    model in ``activation_bytes`` (every block's k/v projections save the same tensor).
    """
    return (q_tokens * inner * BF16 * 2  # query, output (= o's input)
            + kv_tokens * inner * BF16 * 2  # key, value (with prompt slots when prepended)
            + q_tokens * heads * FP32)  # log-sum-exp


def _ffn_bytes(tokens: int, d_ff: int, gated: bool, dropout: bool) -> int:
    """The feed-forward sub-layer's d_ff-wide tensors.

    Gated (v1.1): ``act`` saves ``wi_0 x``, the product saves ``act(wi_0 x)`` and ``wi_1 x``,
    ``wo`` saves its input (the dropout output, or the product itself without dropout): 8 bytes
    per element, plus the mask. Non-gated (v1.0, ReLU): ReLU saves its output, which is ``wo``'s
    input without dropout (2 bytes); with dropout add the mask and the dropped copy (5).
    """
    if gated:
        per_element = 4 * BF16 + (MASK if dropout else 0)
    else:
        per_element = BF16 + ((MASK + BF16) if dropout else 0)
    return tokens * d_ff * per_element


def block_activation_bytes(cfg, micro_batch: int, length: int, encoder_len: int, prompt_len: int,
                           decoder: bool, dropout: bool) -> int:
    """Everything one T5 block saves for backward (encoder block, or decoder block with
    cross-attention over ``encoder_len`` positions)."""
    n = micro_batch * length
    h, inner, heads = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_heads
    total = _norm_bytes(n, h) + _attention_bytes(n, micro_batch * (length + prompt_len), inner, heads)
    if decoder:
        total += _norm_bytes(n, h) + _attention_bytes(n, micro_batch * encoder_len, inner, heads)
    total += _norm_bytes(n, h) + _ffn_bytes(n, cfg.d_ff, cfg.is_gated, dropout)
    if dropout:
        total += n * h * MASK * (3 if decoder else 2)  # after each sub-layer, before the residual add
    return total


@dataclass(frozen=True)
class ActivationEstimate:
    saved: int
    """Bytes saved for backward when the forward of the micro-batch ends."""
    peak: int
    """``saved`` plus the largest transient of the backward pass (the bound to plan with)."""


def activation_bytes(spec: ModelSpec, workload: Workload, micro_batch: int, checkpointing: bool) -> ActivationEstimate:
    """Activation memory of one micro-batch of our T5 (hp_deepspeed/model/t5.py) in bf16.

    Notation: B micro-batch, S encoder length (+ soft prompt), T target length, h d_model,
    i heads*d_kv, a heads, f d_ff, V vocabulary, P key/value prompt slots.

    Without checkpointing every block's saved tensors live until its backward (the sum of
    ``block_activation_bytes``), plus per stack the shared [B, a, L, L] bf16 bias, and outside
    the blocks: the embedding dropout masks, the final norms, the encoder output (saved once by
    all cross-attention k/v projections), the lm_head input, the bf16 logits (returned to the
    trainer, alive through backward) and the fp32 log-softmax of the loss. Task conditioning
    adds what its generator saves (measured on the meta device, see
    ``_conditioning_activation_bytes``) and its outputs gathered to the B examples.

    With per-block checkpointing a block keeps only its arguments: its input hidden state
    (2*B*L*h bytes; the bias, encoder output and prompts are shared), and the backward pass
    recomputes one block at a time, so the largest single block's activations come back on top.

    The backward transient added to get ``peak``: the loss head's fp32 gradient of the
    log-softmax input and output, 8*B*T*V bytes -- for T5 the largest single transient
    (a block's gradients are d_ff-wide, and V > d_ff for every T5 size).
    """
    cfg = spec.config
    b, h, a, vocab = micro_batch, cfg.d_model, cfg.num_heads, cfg.vocab_size
    enc_len = workload.input_len + spec.input_prompt_len
    dec_len = workload.target_len
    dropout = workload.dropout > 0
    enc_prompt = spec.kv_prompt_len if "encoder" in spec.kv_prompt_sides else 0
    dec_prompt = spec.kv_prompt_len if "decoder" in spec.kv_prompt_sides else 0
    n_enc, n_dec = b * enc_len, b * dec_len

    enc_block = block_activation_bytes(cfg, b, enc_len, enc_len, enc_prompt, decoder=False, dropout=dropout)
    dec_block = block_activation_bytes(cfg, b, dec_len, enc_len, dec_prompt, decoder=True, dropout=dropout)

    # A stack's bias is built once and shared by its blocks (saved by SDPA, or kept as a
    # checkpoint argument): [B, a, S, S + P] in the encoder, which carries the padding mask, and
    # [1, a, T, T + P] in the decoder, causal only (the trainer passes no decoder mask; padded
    # labels are -100 and never attended from). P prompt slots get their zero bias once per stack.
    enc_bias = b * a * enc_len * (enc_len + enc_prompt) * BF16
    dec_bias = a * dec_len * (dec_len + dec_prompt) * BF16
    shared = (
        enc_bias + dec_bias
        + n_enc * h * BF16  # encoder output: input of every cross-attention k and v projection
        + (n_enc + n_dec) * 8  # int64 token ids kept by the embedding lookups
        + (enc_len * enc_len + dec_len * dec_len) * 8  # int64 relative-position buckets
        # Conditioning: the generator's intermediates (at most one set per distinct task of the
        # micro-batch) and its outputs gathered to the B examples ([B, blocks, ...] prompts or
        # adapter weights), which the blocks read as views.
        + spec.conditioning_saved_bytes_fixed + min(b, spec.num_tasks) * spec.conditioning_saved_bytes_per_task
        + b * spec.conditioning_bytes_per_example
    )
    outside = (
        # Final layer norms; their outputs are the encoder output and the lm_head input.
        _norm_internal_bytes(n_enc, h) + _norm_internal_bytes(n_dec, h)
        + n_dec * h * BF16  # lm_head input
        + n_dec * vocab * (BF16 + FP32)  # bf16 logits + fp32 log-softmax output
        + n_dec * 8  # labels
    )
    if dropout:
        outside += 2 * (n_enc + n_dec) * h * MASK  # embedding and final dropout of each stack

    loss_transient = 2 * n_dec * vocab * FP32
    if checkpointing:
        kept = cfg.num_layers * n_enc * h * BF16 + cfg.num_decoder_layers * n_dec * h * BF16
        saved = shared + outside + kept
        # The loss gradient is freed before the first block is recomputed, so adding both below
        # over-counts; the larger of it and a norm's backward is kept as the allowance for the
        # recomputed block's own gradients, which are not modelled. rms_norm's gradient, as the
        # CPU decomposes it, holds up to four fp32 [tokens, d_model] temporaries at once (CUDA's
        # fused kernel one); at batch 1 the loss gradient is smaller than that. Measured on the
        # CPU: 2 to 18% over (tests/tools/test_plan.py, docs/testing.md).
        recompute = max(enc_block, dec_block)
        norm_backward = 4 * max(n_enc, n_dec) * h * FP32
        peak = saved + recompute + max(loss_transient, norm_backward)
    else:
        saved = shared + outside + cfg.num_layers * enc_block + cfg.num_decoder_layers * dec_block
        peak = saved + loss_transient
    # The end of the backward: autograd runs the conditioning's backward (the unbind of its
    # per-block outputs, the gather to examples, the generator) after every block. By then the
    # blocks' activations are gone; what is left is the encoder output, the token ids and
    # position buckets, every block's prompt-slot gradients ([B, a, P, d_kv] for keys and values,
    # copied out of the block's key/value gradients by t5._CompactGrad; as views they held the
    # whole [B, a, L + P, d_kv] buffers: +13.6% at 24 + 24 blocks) with their gather to the
    # examples, then the generator's own backward (measured, ``_conditioning_backward_bytes``).
    # The peak for a deep model with a small backbone, e.g. the tests' 24 + 24 tiny blocks.
    inner = cfg.num_heads * cfg.d_kv
    held = (cfg.num_decoder_layers * dec_prompt + cfg.num_layers * enc_prompt) * 2 * b * inner * BF16
    generator = spec.conditioning_backward_bytes_fixed + min(b, spec.num_tasks) * spec.conditioning_backward_bytes_per_task
    end = (n_enc * h * BF16 + (n_enc + n_dec) * 8 + (enc_len * enc_len + dec_len * dec_len) * 8
           + max(held + b * spec.conditioning_bytes_per_example, generator))
    return ActivationEstimate(saved=saved, peak=max(peak, end))


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------
def gpu_budget_bytes(cluster: Cluster, margins: Margins) -> int:
    """What activations and model states may use on one GPU."""
    return int(cluster.gpu_mem_gib * GIB * (1.0 - margins.gpu_fraction) - margins.gpu_reserved_gib * GIB)


def max_micro_batch(spec: ModelSpec, workload: Workload, free_bytes: int, checkpointing: bool,
                    limit: int) -> int:
    """Largest micro-batch <= ``limit`` whose activation peak fits ``free_bytes`` (0 when not
    even one example fits). Activations grow monotonically with the batch: bisect."""
    def fits(mb: int) -> bool:
        return activation_bytes(spec, workload, mb, checkpointing).peak <= free_bytes

    if not fits(1):
        return 0
    low, high = 1, limit + 1  # fits(low), and high is out of range or does not fit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def make_plan(spec: ModelSpec, cluster: Cluster, workload: Workload, margins: Margins = Margins(),
              micro_batch: int | None = None, max_micro_batch_limit: int = 256) -> dict:
    """The whole plan as plain data (what ``--json`` prints and the table is formatted from):
    one option per offload mode, and the suggestion among them (see ``suggest``)."""
    budget = gpu_budget_bytes(cluster, margins)
    cpu_budget = int(cluster.cpu_mem_gib * GIB * (1.0 - margins.cpu_fraction))
    options = [offload_option(spec, cluster, workload, offload, budget, cpu_budget, max_micro_batch_limit)
               for offload in OFFLOAD_MODES]
    per_example = {
        "no_checkpointing": activation_bytes(spec, workload, 1, False),
        "checkpointing": activation_bytes(spec, workload, 1, True),
    }
    return {
        "model": _model_summary(spec),
        "cluster": dataclasses.asdict(cluster) | {"num_gpus": cluster.num_gpus},
        "workload": dataclasses.asdict(workload),
        "margins": dataclasses.asdict(margins),
        "gpu_budget_gib": budget / GIB,
        "activations_per_example_gib": {
            k: {"saved": v.saved / GIB, "peak": v.peak / GIB} for k, v in per_example.items()
        },
        "options": [option for option, _ in options],
        "suggestion": suggest(spec, workload, margins, budget, options, micro_batch),
    }


def offload_option(spec: ModelSpec, cluster: Cluster, workload: Workload, offload: str, budget: int,
                   cpu_budget: int, max_micro_batch_limit: int) -> tuple[dict, int]:
    """One row of the table: the model states of ``offload`` on GPU and CPU and the largest
    micro-batches that fit beside them; and the GPU bytes they leave for activations."""
    gpu_states, cpu_states = model_states_bytes(spec.total_params, spec.largest_layer_params, cluster, offload)
    free = budget - gpu_states
    option = {
        "offload": offload,
        "ds_config": OFFLOAD_DS_CONFIG[offload],
        "gpu_model_states_gib": gpu_states / GIB,
        "gpu_model_states_per_node_gib": gpu_states * cluster.gpus_per_node / GIB,
        "cpu_per_node_gib": cpu_states / GIB,
        "cpu_fits": cpu_states <= cpu_budget,
        "max_micro_batch": max_micro_batch(spec, workload, free, False, max_micro_batch_limit),
        "max_micro_batch_checkpointed": max_micro_batch(spec, workload, free, True, max_micro_batch_limit),
    }
    return option, free


def suggest(spec: ModelSpec, workload: Workload, margins: Margins, budget: int,
            options: list[tuple[dict, int]], micro_batch: int | None) -> dict | None:
    """The first offload option, in ``OFFLOAD_MODES`` order, whose CPU need fits the node and
    that fits at least one example per GPU (or ``micro_batch`` if given); None when none does.

    Within it, activation checkpointing is suggested only when the micro-batch does not fit
    without it: with ``micro_batch`` given that micro-batch is checked, otherwise the largest
    micro-batch that fits without checkpointing is suggested if there is one.
    """
    for option, free in options:
        choice = _micro_batch_choice(spec, workload, option, free, micro_batch) if option["cpu_fits"] else None
        if choice is None:
            continue
        mb, ckpt = choice
        act = activation_bytes(spec, workload, mb, ckpt)
        return {
            "offload": option["offload"],
            "ds_config": option["ds_config"],
            "micro_batch": mb,
            "activation_checkpointing": ckpt,
            # Model states + activation peak + the reserve: what one GPU is expected to use.
            "gpu_estimate_gib": (budget - free + act.peak) / GIB + margins.gpu_reserved_gib,
            "cpu_per_node_gib": option["cpu_per_node_gib"],
        }
    return None


def _micro_batch_choice(spec: ModelSpec, workload: Workload, option: dict, free: int,
                        micro_batch: int | None) -> tuple[int, bool] | None:
    """(micro-batch, activation checkpointing) for one offload option, None if nothing fits."""
    if micro_batch is not None:
        for ckpt in (False, True):
            if activation_bytes(spec, workload, micro_batch, ckpt).peak <= free:
                return micro_batch, ckpt
        return None
    if option["max_micro_batch"] >= 1:
        return option["max_micro_batch"], False
    if option["max_micro_batch_checkpointed"] >= 1:
        return option["max_micro_batch_checkpointed"], True
    return None


def _model_summary(spec: ModelSpec) -> dict:
    """The plan's ``model`` section."""
    cfg = spec.config
    return {
        "name": spec.name,
        "variant": spec.variant,
        "num_tasks": spec.num_tasks,
        "backbone_params": spec.backbone_params,
        "conditioning_params": spec.conditioning_params,
        "total_params": spec.total_params,
        "largest_layer": spec.largest_layer,
        "largest_layer_params": spec.largest_layer_params,
        "kv_prompt_len": spec.kv_prompt_len,
        "input_prompt_len": spec.input_prompt_len,
        "dims": {k: getattr(cfg, k) for k in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                                              "num_decoder_layers", "vocab_size")},
    }


def format_plan(plan: dict) -> str:
    """The human-readable form of ``make_plan``'s result."""
    m, c, w = plan["model"], plan["cluster"], plan["workload"]
    lines = [
        f"model    {m['name']}  conditioning={m['variant']} ({m['num_tasks']} tasks)",
        f"         {m['total_params'] / 1e9:.3f}B parameters = {m['backbone_params'] / 1e9:.3f}B backbone"
        f" + {m['conditioning_params'] / 1e6:.2f}M conditioning;"
        f" largest layer {m['largest_layer']} {m['largest_layer_params'] / 1e6:.1f}M",
        f"cluster  {c['nodes']} node(s) x {c['gpus_per_node']} GPUs x {c['gpu_mem_gib']:g} GB,"
        f" {c['cpu_mem_gib']:g} GB CPU RAM per node ({c['num_gpus']} GPUs)",
        f"workload input {w['input_len']} + target {w['target_len']} tokens, bf16, dropout {w['dropout']:g}"
        + (f", {m['kv_prompt_len']} key/value prompt slots" if m["kv_prompt_len"] else "")
        + (f", {m['input_prompt_len']} soft input tokens" if m["input_prompt_len"] else ""),
        f"budget   {plan['gpu_budget_gib']:.1f} GB per GPU for model states + activations"
        f" ({plan['margins']['gpu_fraction']:.0%} margin, {plan['margins']['gpu_reserved_gib']:g} GB reserved)",
        "",
        "activations per example (GB, peak incl. backward transient):"
        f" {plan['activations_per_example_gib']['no_checkpointing']['peak']:.3f} without,"
        f" {plan['activations_per_example_gib']['checkpointing']['peak']:.3f} with per-block checkpointing",
        "",
    ]
    header = ("offload", "GPU states/GPU", "GPU states/node", "CPU/node", "CPU fits", "max mb", "max mb ckpt")
    rows = [header]
    for o in plan["options"]:
        rows.append((
            o["offload"], f"{o['gpu_model_states_gib']:.2f} GB", f"{o['gpu_model_states_per_node_gib']:.1f} GB",
            f"{o['cpu_per_node_gib']:.1f} GB", "yes" if o["cpu_fits"] else "NO",
            str(o["max_micro_batch"] or "-"), str(o["max_micro_batch_checkpointed"] or "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    lines.append("")
    s = plan["suggestion"]
    if s is None:
        lines.append("suggestion: does NOT fit with any offload mode; use more nodes, shorter sequences "
                     "or NVMe offload (ds_configs/zero3_offload_nvme.json)")
    else:
        lines.append(
            f"suggestion: offload={s['offload']} ({s['ds_config']}), training.micro_batch_size={s['micro_batch']}, "
            f"model.activation_checkpointing={'non_reentrant' if s['activation_checkpointing'] else 'none'}"
        )
        lines.append(f"            ~{s['gpu_estimate_gib']:.1f} of {c['gpu_mem_gib']:g} GB per GPU (incl. the reserve), "
                     f"{s['cpu_per_node_gib']:.1f} of {c['cpu_mem_gib']:g} GB CPU per node")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="preset name: t5-small ... t5-11b, google/t5-v1_1-{small..xxl}, "
                                         "google/flan-t5-*, google/mt5-*, tiny-v1_1 ...")
    source.add_argument("--config", help="a local Hugging Face config.json (or the folder holding it)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU (GiB)")
    parser.add_argument("--cpu-mem-gb", type=float, default=1024.0, help="CPU RAM per node (GiB)")
    parser.add_argument("--input-len", type=int, default=512, help="padded encoder length in tokens")
    parser.add_argument("--target-len", type=int, default=128, help="padded decoder length in tokens")
    parser.add_argument("--dropout", type=float, default=None,
                        help="backbone dropout rate (default: the model config's, 0.1 for the presets)")
    from hp_deepspeed.model.conditioning import Variant

    parser.add_argument("--variant", default="hyperprompt_global", choices=typing.get_args(Variant),
                        help="task-conditioning variant (conditioning.variant)")
    parser.add_argument("--num-tasks", type=int, default=8, help="tasks the conditioning is built for")
    parser.add_argument("--prompt-length", type=int, default=None,
                        help="conditioning.prompt_length (default: ConditioningConfig's)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="check this micro-batch size instead of searching for the largest")
    parser.add_argument("--max-micro-batch", type=int, default=256, help="upper end of the micro-batch search")
    parser.add_argument("--gpu-margin", type=float, default=Margins.gpu_fraction,
                        help="fraction of GPU memory kept free")
    parser.add_argument("--gpu-reserved-gb", type=float, default=Margins.gpu_reserved_gib,
                        help="GiB per GPU for CUDA context, NCCL and workspaces")
    parser.add_argument("--cpu-margin", type=float, default=Margins.cpu_fraction,
                        help="fraction of node RAM kept free")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_from_args(args: argparse.Namespace) -> dict:
    for name in ("nodes", "gpus_per_node", "input_len", "target_len", "num_tasks", "max_micro_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    from hp_deepspeed.model.t5_config import PRESET_ALIASES, PRESETS

    if args.preset is not None and args.preset not in PRESETS and args.preset not in PRESET_ALIASES:
        # Checked here so that a typo is not taken for a hub id and fetched.
        raise ValueError(f"--preset {args.preset!r} is not a preset; known: {', '.join(PRESETS)} "
                         f"(use --config for a local config.json)")
    if args.config is not None and not Path(args.config).exists():
        raise FileNotFoundError(f"--config {args.config}: no such file or folder")
    spec = load_model_spec(args.preset or args.config, args.variant, args.num_tasks, args.prompt_length)
    dropout = spec.config.dropout_rate if args.dropout is None else args.dropout
    return make_plan(
        spec,
        Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.cpu_mem_gb),
        Workload(args.input_len, args.target_len, dropout),
        Margins(args.gpu_margin, args.gpu_reserved_gb, args.cpu_margin),
        micro_batch=args.micro_batch, max_micro_batch_limit=args.max_micro_batch,
    )


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"hp-deepspeed plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["suggestion"] is not None else 1
