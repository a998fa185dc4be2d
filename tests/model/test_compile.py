"""``model.compile``: torch.compile'd blocks in the teacher-forced pass, eager decoding.

The backend here records each graph dynamo hands it and runs it as traced, so the tests check
that the compiled path is really taken and that it computes what the eager blocks compute
(inductor's kernels are a GPU speed question, measured by bench.gpu). ZeRO-3 with compiled
blocks is a case of tests/conditioning/test_zero3.py.
"""

from __future__ import annotations

import pytest
import torch

from hp_deepspeed.model.builder import ModelConfig, build_backbone
from hp_deepspeed.model.generation import greedy_generate
from tests.model.helpers import conditioning_leaves, load_ours, padded_batch, random_conditioning


@pytest.fixture
def graphs():
    """A torch.compile backend that counts the graphs it is given and runs them unchanged."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    yield seen, backend
    torch._dynamo.reset()


def gradients(model, mode: str):
    model.set_activation_checkpointing(mode)
    model.zero_grad(set_to_none=True)
    conditioning = random_conditioning(model.config, batch=3, adapter_dim=4, input_prompt_len=2, requires_grad=True)
    input_ids, attention_mask, labels = padded_batch()
    loss = model(input_ids, attention_mask, labels=labels, conditioning=conditioning).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads.update({f"conditioning.{i}": t.grad.clone() for i, t in enumerate(conditioning_leaves(conditioning))})
    return loss.detach(), grads


@pytest.mark.parametrize("mode", ["none", "non_reentrant"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(tiny_checkpoint, graphs, mode):
    seen, backend = graphs
    folder = tiny_checkpoint("tiny-v1_1")
    # No dropout: the two sides would draw their masks in different orders.
    eager, compiled = (load_ours(folder, dropout_rate=0.0).train() for _ in range(2))
    compiled.compile_blocks(backend)
    loss, reference = gradients(eager, mode)
    compiled_loss, grads = gradients(compiled, mode)
    assert seen, "no block went through torch.compile"
    torch.testing.assert_close(compiled_loss, loss)
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_names_and_decoding_are_unchanged(tiny_checkpoint, graphs):
    seen, backend = graphs
    folder = tiny_checkpoint("tiny-v1_0")
    eager, compiled = load_ours(folder), load_ours(folder)
    compiled.compile_blocks(backend)
    # In place: the wrappers are not submodules, so checkpoints and exports keep HF's names.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    # The encoder pass is compiled; decoding with a cache is not (it would recompile as it grows).
    decoder_calls = []

    def spy(compiled_block):
        def call(*args, **kwargs):
            decoder_calls.append(1)
            return compiled_block(*args, **kwargs)
        return call

    compiled.decoder._compiled = [spy(block) for block in compiled.decoder._compiled]
    input_ids, attention_mask, labels = padded_batch()
    expected = greedy_generate(eager, input_ids, attention_mask, max_new_tokens=6)
    assert torch.equal(greedy_generate(compiled, input_ids, attention_mask, max_new_tokens=6), expected)
    assert seen and not decoder_calls  # the encoder ran compiled, the cached decoder did not
    compiled(input_ids, attention_mask, labels=labels)  # the teacher-forced pass does use them
    assert len(decoder_calls) == len(compiled.decoder.block)


def test_the_config_switch_compiles_the_built_model(graphs):
    seen, backend = graphs
    model = build_backbone(ModelConfig(name_or_path="tiny-v1_0", compile=True, compile_backend=backend))
    assert model.encoder._compiled is not None and model.decoder._compiled is not None
    input_ids, attention_mask, labels = padded_batch()
    model(input_ids, attention_mask, labels=labels)
    assert seen
    plain = build_backbone(ModelConfig(name_or_path="tiny-v1_0"))
    assert plain.encoder._compiled is None and plain.decoder._compiled is None


def test_every_block_of_a_deep_stack_runs_compiled_as_lengths_change():
    """More blocks than dynamo's per-function cache holds (8): the blocks share their graphs,
    so none falls back to eager, before or after the lengths change."""
    import dataclasses

    from hp_deepspeed.model.t5 import T5Model
    from hp_deepspeed.model.t5_config import T5Config

    torch._dynamo.reset()
    config = dataclasses.replace(T5Config.from_pretrained("tiny-v1_1"), num_layers=12, num_decoder_layers=12,
                                 dropout_rate=0.0)
    assert config.num_layers > torch._dynamo.config.cache_size_limit
    model = T5Model(config).train()
    runs = []

    def backend(gm, example_inputs):
        def run(*args):
            runs.append(1)
            return gm.forward(*args)
        return run

    model.compile_blocks(backend)
    for length in (12, 16, 20):
        runs.clear()
        input_ids = torch.randint(2, config.vocab_size, (2, length))
        model(input_ids, labels=torch.randint(2, config.vocab_size, (2, 5))).loss.backward()
        assert len(runs) == 24, length
    torch._dynamo.reset()
