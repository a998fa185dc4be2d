"""The backbone's side of the conditioning contract (layer_conditioning.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hp_deepspeed.model import ConditioningOutput, LayerConditioning, apply_adapter, greedy_generate
from hp_deepspeed.model.layer_conditioning import FEED_FORWARD, SELF_ATTENTION
from hp_deepspeed.model.t5 import T5Attention
from tests.model.helpers import conditioning_leaves, load_ours, padded_batch, random_conditioning

PROMPT_LEN = 3


def record_attention(monkeypatch) -> list[tuple[torch.Size, torch.Tensor]]:
    """Record (key shape, additive mask) of every scaled_dot_product_attention call."""
    calls = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((key.shape, attn_mask.detach().clone()))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def test_prompt_slots_get_zero_bias_and_are_never_masked(tiny_checkpoint, monkeypatch):
    model = load_ours(tiny_checkpoint("tiny-v1_1"))
    input_ids, attention_mask, labels = padded_batch()
    decoder_mask = (labels != -100).long()
    decoder_mask[2, 0] = 0  # a decoder row whose every token key is blocked
    conditioning = random_conditioning(model.config, batch=3, prompt_len=PROMPT_LEN)
    calls = record_attention(monkeypatch)
    with torch.no_grad():
        model(input_ids, attention_mask, labels=labels, decoder_attention_mask=decoder_mask)
        plain = list(calls)
        calls.clear()
        model(input_ids, attention_mask, labels=labels, decoder_attention_mask=decoder_mask, conditioning=conditioning)
    assert len(calls) == len(plain) == model.config.num_layers + 2 * model.config.num_decoder_layers
    prompted = 0
    for (plain_shape, plain_mask), (shape, mask) in zip(plain, calls):
        if shape[2] == plain_shape[2]:  # cross-attention: untouched by key/value prompts
            assert torch.equal(mask, plain_mask)
            continue
        prompted += 1
        assert shape[2] == plain_shape[2] + PROMPT_LEN
        assert (mask[..., :PROMPT_LEN] == 0).all()  # zero bias, and neither padding nor causal masking
        assert torch.equal(mask[..., PROMPT_LEN:], plain_mask.expand_as(mask[..., PROMPT_LEN:]))
        assert (plain_mask <= torch.finfo(plain_mask.dtype).min).any()  # there was masking to escape
    assert prompted == model.config.num_layers + model.config.num_decoder_layers


def test_blocks_with_different_prompt_lengths_each_get_their_own_slots(tiny_checkpoint, monkeypatch):
    """The stack gives each block's prompt slots their zero bias, whatever mix of prompt lengths
    the blocks carry (blocks without prompts keep the plain bias)."""
    model = load_ours(tiny_checkpoint("tiny-v1_1"))
    input_ids, attention_mask, labels = padded_batch()
    conditioning = random_conditioning(model.config, batch=3, prompt_len=PROMPT_LEN)
    short = random_conditioning(model.config, batch=3, prompt_len=1, seed=1)
    conditioning.encoder[0] = LayerConditioning()
    conditioning.decoder[1] = short.decoder[1]
    calls = record_attention(monkeypatch)
    with torch.no_grad():
        model(input_ids, attention_mask, labels=labels, conditioning=conditioning)
    self_attention = calls[:model.config.num_layers] + calls[model.config.num_layers::2]
    slots = [shape[2] - (input_ids.shape[1] if i < model.config.num_layers else labels.shape[1])
             for i, (shape, _) in enumerate(self_attention)]
    assert slots == [0, PROMPT_LEN, PROMPT_LEN, 1, PROMPT_LEN]
    assert (self_attention[3][1][..., :1] == 0).all() and (self_attention[2][1][..., :PROMPT_LEN] == 0).all()


def test_prompted_attention_equals_reference_math(tiny_checkpoint):
    """softmax over [q.kp (no bias) ; q.k + bias] with values [vp ; v], even for fully masked rows."""
    model = load_ours(tiny_checkpoint("tiny-v1_0"))
    attention: T5Attention = model.decoder.block[1].layer[0].SelfAttention
    config = model.config
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, config.d_model, generator=gen)
    bias = torch.randn(2, config.num_heads, 5, 5, generator=gen)
    bias[:, :, 0] = torch.finfo(bias.dtype).min  # query 0 may see no token at all
    bias[1, :, :, 3:] = torch.finfo(bias.dtype).min  # padding
    key_prompt = torch.randn(2, config.num_heads, PROMPT_LEN, config.d_kv, generator=gen)
    value_prompt = torch.randn(2, config.num_heads, PROMPT_LEN, config.d_kv, generator=gen)
    with torch.no_grad():
        # The caller (T5Stack) gives the prompt slots their zero bias.
        out = attention(hidden, F.pad(bias, (PROMPT_LEN, 0)), key_prompt=key_prompt, value_prompt=value_prompt)
        heads = lambda x: x.view(2, 5, config.num_heads, config.d_kv).transpose(1, 2)
        q, k, v = heads(attention.q(hidden)), heads(attention.k(hidden)), heads(attention.v(hidden))
        scores = torch.cat([q @ key_prompt.transpose(-1, -2), q @ k.transpose(-1, -2) + bias], dim=-1)
        mixed = scores.softmax(-1) @ torch.cat([value_prompt, v], dim=2)
        reference = attention.o(mixed.transpose(1, 2).reshape(2, 5, -1))
        # If the prompts were masked for query 0, its output would be a uniform average instead.
        without = attention(hidden, bias)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (out[:, 0] - without[:, 0]).abs().max() > 1e-2


def test_input_prompt_acts_like_prepended_tokens(tiny_checkpoint):
    """An input prompt equal to some tokens' embeddings is exactly those tokens prepended:
    normal positions for the relative bias, never masked, seen by cross-attention."""
    model = load_ours(tiny_checkpoint("tiny-v1_1"))
    input_ids, attention_mask, labels = padded_batch()
    prefix = torch.tensor([[5, 9, 17, 33]]).expand(3, -1)
    with torch.no_grad():
        prompted = model(input_ids, attention_mask, labels=labels,
                         conditioning=ConditioningOutput(input_prompt=model.shared(prefix)))
        concatenated = model(torch.cat([prefix, input_ids], 1),
                             torch.cat([torch.ones_like(prefix), attention_mask], 1), labels=labels)
        plain = model(input_ids, attention_mask, labels=labels)
    assert prompted.encoder_hidden.shape[1] == 4 + input_ids.shape[1]
    torch.testing.assert_close(prompted.logits, concatenated.logits, atol=1e-5, rtol=0)
    assert (prompted.logits - plain.logits).abs().max() > 1e-2


def test_no_conditioning_is_exactly_the_backbone(tiny_checkpoint):
    model = load_ours(tiny_checkpoint("tiny-v1_0"))
    input_ids, attention_mask, labels = padded_batch()
    empty_layers = ConditioningOutput(
        encoder=[LayerConditioning() for _ in model.encoder.block],
        decoder=[LayerConditioning() for _ in model.decoder.block],
    )
    with torch.no_grad():
        plain = model(input_ids, attention_mask, labels=labels).logits
        for conditioning in (ConditioningOutput(), empty_layers):
            assert torch.equal(model(input_ids, attention_mask, labels=labels, conditioning=conditioning).logits, plain)


def test_adapters_act_on_the_self_attention_and_ffn_outputs_before_the_residual(tiny_checkpoint):
    model = load_ours(tiny_checkpoint("tiny-v1_1"))
    input_ids, attention_mask, labels = padded_batch()
    conditioning = random_conditioning(model.config, batch=3, prompt_len=0, adapter_dim=4)
    attn, ff = model.decoder.block[2].layer[0], model.decoder.block[2].layer[2]
    seen = {}
    attn.register_forward_hook(lambda module, args, out: seen.update(attn_in=args[0], attn_out=out))
    attn.SelfAttention.register_forward_hook(lambda module, args, out: seen.update(sa_out=out))
    ff.register_forward_hook(lambda module, args, out: seen.update(ff_in=args[0], ff_out=out))
    ff.DenseReluDense.register_forward_hook(lambda module, args, out: seen.update(dense_out=out))
    with torch.no_grad():
        with_adapter = model(input_ids, attention_mask, labels=labels, conditioning=conditioning)
        # eval mode: the sub-layer's dropout is the identity
        cond = conditioning.decoder[2]
        torch.testing.assert_close(seen["attn_out"], seen["attn_in"] + apply_adapter(seen["sa_out"], cond, SELF_ATTENTION))
        torch.testing.assert_close(seen["ff_out"], seen["ff_in"] + apply_adapter(seen["dense_out"], cond, FEED_FORWARD))
        plain = model(input_ids, attention_mask, labels=labels)
    assert (with_adapter.logits - plain.logits).abs().max() > 1e-2


def test_apply_adapter_is_the_residual_swish_bottleneck_with_its_output_layer_norm():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=gen)
    cond = LayerConditioning(
        adapter_down=torch.randn(2, 2, 8, 3, generator=gen), adapter_down_bias=torch.randn(2, 2, 3, generator=gen),
        adapter_up=torch.randn(2, 2, 3, 8, generator=gen), adapter_up_bias=torch.randn(2, 2, 8, generator=gen),
        adapter_norm_weight=torch.randn(2, 2, 8, generator=gen), adapter_norm_bias=torch.randn(2, 2, 8, generator=gen),
    )
    for site in (SELF_ATTENTION, FEED_FORWARD):
        for b in range(2):
            up = torch.nn.functional.silu(h[b] @ cond.adapter_down[b, site] + cond.adapter_down_bias[b, site])
            up = up @ cond.adapter_up[b, site] + cond.adapter_up_bias[b, site]
            normed = torch.nn.functional.layer_norm(up, (8,), cond.adapter_norm_weight[b, site], cond.adapter_norm_bias[b, site])
            torch.testing.assert_close(apply_adapter(h, cond, site)[b], h[b] + normed)


def test_gradients_reach_every_conditioning_tensor(tiny_checkpoint):
    model = load_ours(tiny_checkpoint("tiny-v1_0"))
    input_ids, attention_mask, labels = padded_batch()
    conditioning = random_conditioning(model.config, batch=3, adapter_dim=4, input_prompt_len=2, requires_grad=True)
    model(input_ids, attention_mask, labels=labels, conditioning=conditioning).loss.backward()
    for tensor in conditioning_leaves(conditioning):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_cached_decoding_with_prompts_equals_full_recompute(tiny_checkpoint):
    model = load_ours(tiny_checkpoint("tiny-v1_1"))
    input_ids, attention_mask, _ = padded_batch(seed=11)
    conditioning = random_conditioning(model.config, batch=3, adapter_dim=4, input_prompt_len=2, seed=3)
    with torch.no_grad():
        cached = greedy_generate(model, input_ids, attention_mask, max_new_tokens=9, conditioning=conditioning)
        full = greedy_generate(model, input_ids, attention_mask, max_new_tokens=9, conditioning=conditioning,
                               use_cache=False)
        plain = greedy_generate(model, input_ids, attention_mask, max_new_tokens=9)
        assert torch.equal(cached, full)
        assert not torch.equal(cached, plain)  # the prompts matter
        # Step by step, the cached logits equal the full forward's at every position.
        encoder_hidden, encoder_mask = model.encode(input_ids, attention_mask, conditioning)
        full_logits = model.decode(full[:, :-1], encoder_hidden, encoder_mask, conditioning=conditioning)
        cache = model.new_cache()
        for step in range(full.shape[1] - 1):
            logits = model.decode_step(full[:, step : step + 1], encoder_hidden, encoder_mask, cache, conditioning)
            torch.testing.assert_close(logits, full_logits[:, step], atol=1e-5, rtol=1e-5)
        assert cache.length == full.shape[1] - 1

