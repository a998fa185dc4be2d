"""The memory planner's arithmetic: model states, activations, and the plan built from them.

Owns: the inputs of a plan (:class:`Cluster`, :class:`Workload`, :class:`Margins`), the ZeRO-3
model states per GPU and per node (DeepSpeed's own estimator), the activation memory of one
micro-batch derived term by term from what our T5 saves for backward (``activation_bytes``),
the GPU budget, the largest micro-batch that fits, and the plan with its suggestion
(``make_plan``).

Does not own: measuring the model (``plan_model.py``: parameter counts and what the task
conditioning saves, read into a ``ModelSpec``), nor the table and the command line (``plan.py``).
All "GB" are GiB (2**30 bytes), the unit DeepSpeed's estimator prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass

from hp_deepspeed.tools.plan_model import ModelSpec

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
    ``plan_model.conditioning_activation_bytes``) and its outputs gathered to the B examples.

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
    # copied out of the block's key/value gradients by t5._CompactGrad, so they do not hold the
    # whole [B, a, L + P, d_kv] buffers) with their gather to the examples, then the generator's
    # own backward (measured, ``plan_model.conditioning_backward_bytes``).
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
