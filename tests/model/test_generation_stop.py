"""Greedy decoding checks for the stop only every few tokens (each check is a host sync) and
still returns what stopping at the first all-finished step returns."""

from types import SimpleNamespace

import pytest
import torch

from hp_deepspeed.model import generation

EOS, PAD, VOCAB = 1, 0, 7


class ScriptedDecoder(torch.nn.Module):
    """Emits a fixed token script per sequence (one row per sequence, one column per step)."""

    def __init__(self, script):
        super().__init__()
        self.script = torch.tensor(script)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
        self.steps = 0

    def encode(self, input_ids, attention_mask, conditioning):
        return None, None

    def new_cache(self):
        return object()

    def decode_step(self, last_tokens, encoder_hidden, encoder_mask, cache, conditioning):
        self.steps += 1
        return torch.nn.functional.one_hot(self.script[:, self.steps - 1], VOCAB).float()


@pytest.mark.parametrize("script, expected_len", [
    ([[5, EOS, 3, 3, 3, 3, 3, 3], [4, 4, 4, EOS, 3, 3, 3, 3]], 5),  # both done after step 4
    ([[EOS, 3, 3, 3, 3, 3, 3, 3], [5, EOS, 3, 3, 3, 3, 3, 3]], 3),  # done after step 2
    ([[5, 5, 5, 5, 5, 5, 5, 5], [EOS, 3, 3, 3, 3, 3, 3, 3]], 9),    # never: max_new_tokens
])
def test_checking_every_few_tokens_returns_the_same_sequences(monkeypatch, script, expected_len):
    outputs = {}
    for every in (1, generation.STOP_CHECK_EVERY):
        monkeypatch.setattr(generation, "STOP_CHECK_EVERY", every)
        outputs[every] = generation.greedy_generate(ScriptedDecoder(script), torch.zeros(2, 3, dtype=torch.long),
                                                    max_new_tokens=8)
    assert outputs[1].shape[1] == expected_len
    assert outputs[1].tolist() == outputs[generation.STOP_CHECK_EVERY].tolist()
