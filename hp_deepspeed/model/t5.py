"""A compact T5 encoder-decoder with HyperPrompt-style conditioning hooks.

Parameter names are exactly those of Hugging Face's ``T5ForConditionalGeneration`` (``shared``,
``encoder.block.3.layer.1.DenseReluDense.wi_0`` ...), so loading and saving HF checkpoints is a
name-for-name copy. The computation is our own and deliberately small:

* attention runs through ``F.scaled_dot_product_attention`` with ``scale=1.0`` (T5 folds the
  1/sqrt(d) into its initialisation) and the relative position bias plus the padding / causal
  mask passed as one additive float mask;
* the relative position bias table lives in the first block of each stack, as in HF, but the
  bias is computed once per forward by the stack (by *calling* that embedding module, so ZeRO-3's
  hooks gather it) and handed to every block as an argument;
* every block takes its conditioning tensors (``LayerConditioning.as_args()``) as explicit
  positional arguments, so activation checkpointing of either flavour recomputes them and
  gradients reach whatever produced them;
* key/value prompts are prepended to the keys/values of the block's self-attention with zero
  position bias and are never masked; they are kept out of the generation cache and
  concatenated at every step, so cached and uncached decoding see the same prompts;
* packed rows (``data.packing``: several examples end to end per row, told apart by segment
  ids 1..S, 0 on padding) attend block-diagonally: a token sees the tokens of its own segment
  only (causally in the decoder), its own segment's encoder tokens, and its own segment's
  key/value prompts, so a packed batch computes what the unpacked one does. The relative
  position bias needs nothing: within a contiguous segment the distance between two tokens is
  the difference of their positions in the row, as it is unpacked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hp_deepspeed.model import random_init
from hp_deepspeed.model.layer_conditioning import (
    FEED_FORWARD,
    SELF_ATTENTION,
    ConditioningOutput,
    LayerConditioning,
    apply_adapter,
)
from hp_deepspeed.model.t5_config import T5Config

ActivationCheckpointing = Literal["none", "reentrant", "non_reentrant"]
# Number of tensors in LayerConditioning.as_args(); a block receives this many conditioning args.
_NUM_COND_ARGS = len(LayerConditioning().as_args())


def _check_checkpointing(mode: str) -> None:
    modes = get_args(ActivationCheckpointing)
    if mode not in modes:
        raise ValueError(f"activation_checkpointing={mode!r}: expected {', '.join(modes[:-1])} or {modes[-1]}")


def _normal_(param: Tensor, std: float) -> None:
    """Random-init ``param``; meta tensors have no values, and skipping them keeps building an
    11B model on the meta device (to count parameters) instantaneous.

    Under ``deepspeed.zero.Init`` a child module's parameters are partitioned as soon as the
    child's constructor returns, so a parent initialising them afterwards would write into an
    empty partition and be silently lost: gather, initialise on rank 0, re-partition. Every rank
    runs the body, so the random streams stay in step with a plain build. The values come from
    the CPU (random_init), so a GPU build gets the weights of a CPU build."""
    if param.is_meta:
        return
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            random_init.normal_(param, std)
    else:
        random_init.normal_(param, std)


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation {name!r}")


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; the statistics are always computed in fp32."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, hidden: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32 as one op: CUDA has a fused kernel for it (one
        # launch forward and backward instead of five), the CPU decomposes it into the same ops.
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        # Half-precision weights: round to the weights' dtype, then scale, as T5's reference does.
        return self.weight * normed.to(self.weight.dtype)


@dataclass
class LayerKVCache:
    """Keys/values of one decoder block during incremental decoding (tokens only, no prompts)."""

    self_key: Tensor | None = None
    """[batch, heads, positions so far, d_kv]"""
    self_value: Tensor | None = None
    cross_key: Tensor | None = None
    """[batch, heads, encoder length, d_kv]; computed at the first step, reused afterwards."""
    cross_value: Tensor | None = None


@dataclass
class DecoderCache:
    """Generation state of the whole decoder."""

    layers: list[LayerKVCache]
    """One entry per decoder block."""

    @property
    def length(self) -> int:
        """Decoder positions already processed (the offset of the next query)."""
        first = self.layers[0].self_key
        return 0 if first is None else first.shape[2]


class _CompactGrad(torch.autograd.Function):
    """Identity whose backward hands on a compact copy of the incoming gradient.

    The gradient of a key/value prompt is a slice of its block's [B, heads, P + L, d_kv] key or
    value gradient (``torch.cat``'s backward returns views). The conditioning's per-block outputs
    are unbound before the first block runs, so autograd, which runs ready nodes newest first,
    applies that unbind's backward only after every block: as views, the slices kept every
    block's whole key and value gradients alive until then (measured on the CPU with
    checkpointing at 24 + 24 blocks: +8.9% peak, tests/tools/test_plan.py; by the planner's
    count about 0.11 GB per example at T5-XXL's 512 / 128 tokens). Copying the P slots lets each
    buffer go with its block.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clone(memory_format=torch.contiguous_format)


class T5Attention(nn.Module):
    """Multi-head attention without score scaling; self-attention may carry the bias table."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner, d_model, f = config.inner_dim, config.d_model, config.initializer_factor
        self.dropout = config.dropout_rate
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        # Mesh-TF initialisation: the query absorbs the 1/sqrt(d_kv) that attention omits.
        _normal_(self.q.weight, f * (d_model * self.d_kv) ** -0.5)
        _normal_(self.k.weight, f * d_model**-0.5)
        _normal_(self.v.weight, f * d_model**-0.5)
        _normal_(self.o.weight, f * inner**-0.5)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, self.num_heads)
            _normal_(self.relative_attention_bias.weight, f * d_model**-0.5)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def forward(
        self,
        hidden: Tensor,
        bias: Tensor,
        key_value_states: Tensor | None = None,
        key_prompt: Tensor | None = None,
        value_prompt: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """``bias`` is the additive float mask [batch or 1, heads or 1, queries, keys], where the
        keys start with the key/value prompt slots if any (``T5Stack`` gives them their zero bias);
        cross-attention when ``key_value_states`` is given, self-attention otherwise."""
        query = self._heads(self.q(hidden))
        if key_value_states is not None:
            if cache is not None and cache.cross_key is not None:
                key, value = cache.cross_key, cache.cross_value
            else:
                key, value = self._heads(self.k(key_value_states)), self._heads(self.v(key_value_states))
                if cache is not None:
                    cache.cross_key, cache.cross_value = key, value
        else:
            key, value = self._heads(self.k(hidden)), self._heads(self.v(hidden))
            if cache is not None:
                if cache.self_key is not None:
                    key = torch.cat([cache.self_key, key], dim=2)
                    value = torch.cat([cache.self_value, value], dim=2)
                cache.self_key, cache.self_value = key, value
            if key_prompt is not None:
                # Prompt slots: prepended, never cached (see the module docstring).
                key = torch.cat([_CompactGrad.apply(key_prompt.to(key.dtype)), key], dim=2)
                value = torch.cat([_CompactGrad.apply(value_prompt.to(value.dtype)), value], dim=2)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias.to(query.dtype),
            dropout_p=self.dropout if self.training else 0.0, scale=1.0,
        )
        out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    """Pre-norm self-attention sub-layer with residual; the adapter (if any) acts on its output before it."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden, bias, key_prompt=None, value_prompt=None, cache=None, cond=None):
        attn = self.SelfAttention(self.layer_norm(hidden), bias, None, key_prompt, value_prompt, cache)
        return hidden + self.dropout(apply_adapter(attn, cond, SELF_ATTENTION))


class T5LayerCrossAttention(nn.Module):
    """Pre-norm encoder-decoder attention sub-layer with residual (no position bias)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden, encoder_hidden, bias, cache=None):
        attn = self.EncDecAttention(self.layer_norm(hidden), bias, encoder_hidden, cache=cache)
        return hidden + self.dropout(attn)


class T5DenseActDense(nn.Module):
    """v1.0 feed-forward: ``wo(dropout(act(wi x)))``."""

    def __init__(self, config: T5Config):
        super().__init__()
        f = config.initializer_factor
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        _normal_(self.wi.weight, f * config.d_model**-0.5)
        _normal_(self.wo.weight, f * config.d_ff**-0.5)
        self.act = _activation(config.activation)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.wo(self.dropout(self.act(self.wi(hidden))))


class T5DenseGatedActDense(nn.Module):
    """v1.1 feed-forward: ``wo(dropout(act(wi_0 x) * wi_1 x))``."""

    def __init__(self, config: T5Config):
        super().__init__()
        f = config.initializer_factor
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        _normal_(self.wi_0.weight, f * config.d_model**-0.5)
        _normal_(self.wi_1.weight, f * config.d_model**-0.5)
        _normal_(self.wo.weight, f * config.d_ff**-0.5)
        self.act = _activation(config.activation)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.wo(self.dropout(self.act(self.wi_0(hidden)) * self.wi_1(hidden)))


class T5LayerFF(nn.Module):
    """Pre-norm feed-forward sub-layer; the adapter (if any) acts on its output before the residual."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden: Tensor, cond: LayerConditioning | None) -> Tensor:
        ffn = apply_adapter(self.DenseReluDense(self.layer_norm(hidden)), cond, FEED_FORWARD)
        return hidden + self.dropout(ffn)


class T5Block(nn.Module):
    """One encoder block (self-attn, FFN) or decoder block (self-attn, cross-attn, FFN)."""

    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(
        self,
        hidden: Tensor,
        self_bias: Tensor,
        encoder_hidden: Tensor | None,
        cross_bias: Tensor | None,
        key_prompt: Tensor | None,
        value_prompt: Tensor | None,
        adapter_down: Tensor | None,
        adapter_down_bias: Tensor | None,
        adapter_up: Tensor | None,
        adapter_up_bias: Tensor | None,
        adapter_norm_weight: Tensor | None,
        adapter_norm_bias: Tensor | None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """All tensors positional (the checkpointing contract); ``cache`` only when generating."""
        cond = LayerConditioning(key_prompt, value_prompt, adapter_down, adapter_down_bias, adapter_up, adapter_up_bias,
                                 adapter_norm_weight, adapter_norm_bias)
        hidden = _clamp_fp16(self.layer[0](hidden, self_bias, key_prompt, value_prompt, cache, cond))
        if self.is_decoder:
            hidden = _clamp_fp16(self.layer[1](hidden, encoder_hidden, cross_bias, cache))
        return _clamp_fp16(self.layer[-1](hidden, cond))


def _clamp_fp16(hidden: Tensor) -> Tensor:
    """T5's residual stream outgrows float16 (pre-trained checkpoints reach ~1e5); keep it finite
    as the reference implementation does. A no-op in float32 and bfloat16."""
    if hidden.dtype != torch.float16:
        return hidden
    bound = torch.finfo(torch.float16).max - 1000
    return hidden.clamp(min=-bound, max=bound)


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucketing of ``key_pos - query_pos``: exact for small distances, log-spaced beyond.

    Bidirectional (encoder): half the buckets for each sign. Unidirectional (decoder): only
    keys at or before the query get distinct buckets (future keys are masked anyway).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway.
    log_bucket = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class Segments(NamedTuple):
    """Packed rows: which example each token belongs to (``data.packing``)."""

    input: Tensor
    """[batch, input length] segment of each input token, 1..count along a row, 0 on padding."""
    target: Tensor
    """[batch, target length] segment of each target token, likewise."""
    count: int
    """Segment slots per row (the most segments of any row)."""


def _blocked_value(dtype: torch.dtype) -> float:
    """The bias of a blocked key: the dtype's minimum, not -inf, so that a fully padded row
    yields a uniform softmax instead of NaN."""
    return torch.finfo(dtype).min


def _cross_attention_bias(encoder_hidden: Tensor, encoder_attention_mask: Tensor | None, dtype: torch.dtype,
                          segment_ids: Tensor | None = None, encoder_segment_ids: Tensor | None = None) -> Tensor:
    """Padding masking of the encoder positions, no position bias: [batch, 1, 1, encoder length];
    packed, also each decoder segment to its own encoder segment: [batch, 1, queries, encoder length]."""
    if encoder_attention_mask is None:
        encoder_attention_mask = torch.ones(encoder_hidden.shape[:2], device=encoder_hidden.device)
    bias = torch.zeros(encoder_attention_mask.shape, dtype=dtype, device=encoder_hidden.device)
    bias = bias.masked_fill(encoder_attention_mask == 0, _blocked_value(dtype))[:, None, None, :]
    if segment_ids is None:
        return bias
    return bias.masked_fill(_segment_blocked(segment_ids, encoder_segment_ids), _blocked_value(dtype))


def _segment_blocked(query_segments: Tensor, key_segments: Tensor) -> Tensor:
    """[batch, 1, queries, keys]: True where a query and a key lie in different segments."""
    return (query_segments[:, None, :, None] != key_segments[:, None, None, :])


def _with_prompt_slots(bias: Tensor, conditioning: list[LayerConditioning] | None, num_blocks: int,
                       segment_ids: Tensor | None = None, num_segments: int = 1) -> list[Tensor]:
    """The self-attention bias of each block, with a zero (never masked) column per key/value
    prompt slot the block prepends. Packed (``segment_ids`` [batch, queries]), a row's slots are
    its ``num_segments`` segments' prompts one after another (``pack_prompts``), and a query sees
    only its own segment's.

    The one place prompt slots get their bias: once per distinct prompt length, so the blocks
    of a stack (which all carry the same number of slots) share one padded tensor instead of
    re-padding it (and un-padding its gradient in backward) per block."""
    if conditioning is None:
        return [bias] * num_blocks
    lengths = [0 if c.key_prompt is None else c.key_prompt.shape[2] for c in conditioning]
    padded = {0: bias}
    for length in lengths:
        if length in padded:
            continue
        if segment_ids is None:
            padded[length] = F.pad(bias, (length, 0))
            continue
        slot_segments = torch.arange(length, device=bias.device) // (length // num_segments) + 1
        blocked = _segment_blocked(segment_ids, slot_segments.expand(segment_ids.shape[0], -1))
        slots = torch.zeros(blocked.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            blocked, _blocked_value(bias.dtype))
        padded[length] = torch.cat([slots.expand(-1, bias.shape[1], -1, -1), bias.expand(slots.shape[0], -1, -1, -1)],
                                   dim=-1)
    return [padded[length] for length in lengths]


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks plus final norm. Embedding happens in ``T5Model``."""

    def __init__(self, config: T5Config, is_decoder: bool, activation_checkpointing: ActivationCheckpointing = "none"):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        self.activation_checkpointing = activation_checkpointing
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, has_relative_attention_bias=(i == 0)) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        # Compiled callables of the blocks for the teacher-forced pass (compile_blocks). A plain
        # list, not a ModuleList: the wrappers must not appear in state_dict or parameters().
        self._compiled: list | None = None

    def compile_blocks(self, backend: str) -> None:
        """Run each block through ``torch.compile`` in the teacher-forced pass (training and
        scoring). Decoding with a cache stays eager: its cache grows by one position per call,
        which would only recompile. Parameters stay the blocks' own, so names, checkpoints and
        ZeRO's partitioning are unchanged."""
        self._compiled = [torch.compile(block, backend=backend) for block in self.block]

    def position_bias(self, query_len: int, key_len: int, offset: int, device: torch.device) -> Tensor:
        """[1, heads, query_len, key_len] bias for queries at ``offset .. offset+query_len-1``."""
        query_pos = torch.arange(offset, offset + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(
            key_pos - query_pos, bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        # Called as a module so that ZeRO-3's hooks gather the table (it is not this module's).
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0)

    def self_attention_bias(self, hidden: Tensor, attention_mask: Tensor | None, offset: int,
                            segment_ids: Tensor | None = None) -> Tensor:
        """Position bias plus causal (decoder), padding and (packed, ``segment_ids`` [batch,
        length]) segment masking for the queries of ``hidden`` at ``offset ..``: [batch or 1,
        heads, queries, keys so far]."""
        length = hidden.shape[1]
        key_len = offset + length
        bias = self.position_bias(length, key_len, offset, hidden.device)
        blocked = None
        if self.is_decoder:
            blocked = (torch.arange(key_len, device=hidden.device)[None, :]
                       > torch.arange(offset, key_len, device=hidden.device)[:, None])[None, None]
        if attention_mask is not None:
            padding = attention_mask[:, None, None, :] == 0
            blocked = padding if blocked is None else blocked | padding
        if segment_ids is not None:
            other = _segment_blocked(segment_ids, segment_ids)
            blocked = other if blocked is None else blocked | other
        if blocked is None:
            return bias
        return bias.masked_fill(blocked, _blocked_value(hidden.dtype))

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        conditioning: list[LayerConditioning] | None = None,
        cache: DecoderCache | None = None,
        segments: Segments | None = None,
    ) -> Tensor:
        """``hidden``: embedded inputs [batch, len, d_model]; masks are 1 = attend, 0 = padding.

        With a ``cache`` (decoder only) ``hidden`` holds just the new positions and
        ``attention_mask``, if given, covers all positions so far. ``segments``: packed rows
        (teacher-forced only), whose key/value prompts are laid out by ``pack_prompts``.
        """
        if conditioning is not None and len(conditioning) != len(self.block):
            raise ValueError(f"conditioning has {len(conditioning)} entries for {len(self.block)} blocks")
        if segments is not None and cache is not None:
            raise ValueError("packed rows (segments) are for the teacher-forced pass, not for cached decoding")
        offset = cache.length if cache is not None else 0
        own = encoder_segments = None
        if segments is not None:
            own, encoder_segments = ((segments.target, segments.input) if self.is_decoder else (segments.input, None))
        self_biases = _with_prompt_slots(self.self_attention_bias(hidden, attention_mask, offset, own),
                                         conditioning, len(self.block), own,
                                         segments.count if segments is not None else 1)
        cross_bias = None
        if encoder_hidden is not None:
            cross_bias = _cross_attention_bias(encoder_hidden, encoder_attention_mask, hidden.dtype, own,
                                               encoder_segments)

        hidden = self.dropout(hidden)
        use_checkpoint = self.activation_checkpointing != "none" and self.training and cache is None
        blocks = self._compiled if self._compiled is not None and cache is None else self.block
        for i, block in enumerate(blocks):
            cond_args = conditioning[i].as_args() if conditioning is not None else (None,) * _NUM_COND_ARGS
            args = (hidden, self_biases[i], encoder_hidden, cross_bias, *cond_args)
            if use_checkpoint:
                hidden = checkpoint(block, *args, use_reentrant=self.activation_checkpointing == "reentrant")
            else:
                hidden = block(*args, cache=cache.layers[i] if cache is not None else None)
        return self.dropout(self.final_layer_norm(hidden))


def pack_prompts(conditioning: ConditioningOutput, rows: int, count: int) -> ConditioningOutput:
    """Per-segment conditioning ([rows * count] first, a row's segments in order) as per-row key/
    value prompts: a row's slots are its segments' prompts one after another, [rows, heads,
    count * prompt_len, d_kv], and ``_with_prompt_slots`` masks each to its segment. Input
    prompts and adapters act on whole rows, so packed rows cannot carry them."""
    if conditioning.input_prompt is not None:
        raise ValueError("packed rows cannot take an input prompt (prompt_tuning): it would be one per row, "
                         "not one per segment")

    def per_row(layers: list[LayerConditioning] | None) -> list[LayerConditioning] | None:
        if layers is None:
            return None
        packed = []
        for layer in layers:
            if layer.adapter_down is not None:
                raise ValueError("packed rows cannot take per-example adapters (hyperformer, adapter)")
            if layer.key_prompt is None:
                packed.append(layer)
                continue
            prompts = []
            for prompt in (layer.key_prompt, layer.value_prompt):
                heads, length, d_kv = prompt.shape[1:]
                prompts.append(prompt.view(rows, count, heads, length, d_kv).transpose(1, 2)
                               .reshape(rows, heads, count * length, d_kv))
            packed.append(layer._replace(key_prompt=prompts[0], value_prompt=prompts[1]))
        return packed

    return conditioning._replace(encoder=per_row(conditioning.encoder), decoder=per_row(conditioning.decoder))


class T5Output(NamedTuple):
    """What ``T5Model.forward`` returns.

    A NamedTuple, so ZeRO-3's module hooks see the tensors inside it (they walk tuples, lists
    and dicts, not dataclasses).
    """

    logits: Tensor
    """[batch, target_len, vocab]"""
    loss: Tensor | None = None
    """Mean cross-entropy over label tokens != -100 (HF's definition); None without labels."""
    example_loss_sum: Tensor | None = None
    """[batch] summed cross-entropy of each example's label tokens (fp32); packed, [rows *
    segment slots], one entry per segment (0 for a row's empty slots)."""
    example_token_count: Tensor | None = None
    """[batch] number of label tokens != -100 per example; packed, per segment likewise."""
    encoder_hidden: Tensor | None = None
    """[batch, (prompt +) source_len, d_model] the encoder output."""


class T5Model(nn.Module):
    """T5 for conditional generation (HF parameter names), optionally task-conditioned."""

    def __init__(self, config: T5Config, activation_checkpointing: ActivationCheckpointing = "none"):
        super().__init__()
        _check_checkpointing(activation_checkpointing)
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        _normal_(self.shared.weight, config.initializer_factor)
        self.encoder = T5Stack(config, is_decoder=False, activation_checkpointing=activation_checkpointing)
        self.decoder = T5Stack(config, is_decoder=True, activation_checkpointing=activation_checkpointing)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # One Parameter in two modules, as HF does; ZeRO-3 gathers it through either module.
            self.lm_head.weight = self.shared.weight
        else:
            _normal_(self.lm_head.weight, config.initializer_factor)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` every encoder and decoder block (see ``T5Stack.compile_blocks``)."""
        self.encoder.compile_blocks(backend)
        self.decoder.compile_blocks(backend)

    def zero3_leaf_blocks(self) -> list[T5Block]:
        """The blocks ZeRO-3 may gather as one unit ("leaf modules": one pair of hooks and one
        gather per block instead of one per linear layer and norm).

        Every block except each stack's first: the first holds the relative position bias
        table, which the stack calls *outside* that block's forward (``position_bias``). A
        leaf's children get no hooks, so the table would then be gathered only by DeepSpeed's
        fallback for parameters read outside their module's hooks (``ZeROOrderedDict``, which
        gathers on access and re-registers the table to the stack); with its own hooks it is
        gathered the way every other call is, at the cost of two blocks out of 2 x num_layers."""
        return [block for stack in (self.encoder, self.decoder) for block in stack.block[1:]]

    def set_activation_checkpointing(self, mode: ActivationCheckpointing) -> None:
        """Switch per-block checkpointing (``none``, ``reentrant``, ``non_reentrant``)."""
        _check_checkpointing(mode)
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = mode

    def encode(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, conditioning: ConditioningOutput | None = None,
        segments: Segments | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the encoder; returns (hidden [B, l+len, d], mask [B, l+len]) including input-prompt slots."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.shared(input_ids)
        layer_cond = None
        if conditioning is not None:
            if conditioning.input_prompt is not None:
                prompt = conditioning.input_prompt.to(hidden.dtype)
                hidden = torch.cat([prompt, hidden], dim=1)
                attention_mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
            layer_cond = conditioning.encoder
        return self.encoder(hidden, attention_mask, conditioning=layer_cond, segments=segments), attention_mask

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_attention_mask: Tensor,
        decoder_attention_mask: Tensor | None = None,
        conditioning: ConditioningOutput | None = None,
        cache: DecoderCache | None = None,
        segments: Segments | None = None,
    ) -> Tensor:
        """Decoder plus LM head; returns logits. With ``cache``, ``decoder_input_ids`` are the new tokens only."""
        hidden = self.decoder(
            self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden, encoder_attention_mask,
            conditioning=conditioning.decoder if conditioning is not None else None, cache=cache, segments=segments,
        )
        if self.config.tie_word_embeddings:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def new_cache(self) -> DecoderCache:
        """An empty generation cache for ``decode_step``."""
        return DecoderCache([LayerKVCache() for _ in self.decoder.block])

    def decode_step(
        self,
        next_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_attention_mask: Tensor,
        cache: DecoderCache,
        conditioning: ConditioningOutput | None = None,
    ) -> Tensor:
        """One incremental step: ``next_ids`` [B, 1] -> logits [B, vocab]; updates ``cache`` in place."""
        return self.decode(next_ids, encoder_hidden, encoder_attention_mask, None, conditioning, cache)[:, -1]

    def shift_right(self, labels: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        """Decoder inputs from labels: prepend decoder_start_token_id, drop the last, -100 -> pad.
        Packed (``segment_ids`` of the labels), each segment starts with decoder_start_token_id."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        if segment_ids is not None:
            starts = segment_ids[:, 1:] != segment_ids[:, :-1]
            shifted[:, 1:] = shifted[:, 1:].masked_fill(starts, self.config.decoder_start_token_id)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        conditioning: ConditioningOutput | None = None,
        segments: Segments | None = None,
    ) -> T5Output:
        """``segments``: the batch is packed rows (``Segments``), ``conditioning`` then per
        segment ([rows * segments.count], ``pack_prompts``), and the per-example outputs are per
        segment."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5Model.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels, segments.target if segments is not None else None)
        if segments is not None and conditioning is not None:
            conditioning = pack_prompts(conditioning, input_ids.shape[0], segments.count)
        encoder_hidden, encoder_mask = self.encode(input_ids, attention_mask, conditioning, segments)
        logits = self.decode(decoder_input_ids, encoder_hidden, encoder_mask, decoder_attention_mask, conditioning,
                             segments=segments)
        if labels is None:
            return T5Output(logits=logits, encoder_hidden=encoder_hidden)
        # fp32 cross-entropy whatever the training dtype; per-token so that the trainer can
        # report per-task loss, and the mean over all label tokens equals HF's loss.
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        valid = labels != -100
        if segments is None:
            loss_sum, token_count = (token_loss * valid).sum(dim=1), valid.sum(dim=1)
        else:  # per segment: a [rows, length, count] one-hot of the segments, contracted
            one_hot = (segments.target[..., None] == torch.arange(1, segments.count + 1, device=labels.device)) & valid[..., None]
            loss_sum = torch.einsum("rt,rts->rs", token_loss * valid, one_hot.float()).flatten()
            token_count = one_hot.sum(dim=1).flatten()
        return T5Output(logits=logits, loss=loss_sum.sum() / token_count.sum(), example_loss_sum=loss_sum,
                        example_token_count=token_count, encoder_hidden=encoder_hidden)
