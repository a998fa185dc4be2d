"""Greedy decoding for evaluation and prediction.

The encoder runs once; the decoder then advances one token per step through
``T5Model.decode_step`` with an incremental key/value cache (``use_cache=False`` recomputes the
whole prefix every step: slower, used by tests as the reference). Conditioning is passed to
every step, so key/value prompts are present at each position whichever path is taken.

Output follows HF's ``generate(do_sample=False, num_beams=1)``: sequences start with
``decoder_start_token_id``; a sequence that emitted ``eos_token_id`` is padded with
``pad_token_id`` afterwards; decoding stops after ``max_new_tokens`` or when every sequence has
finished, whichever comes first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hp_deepspeed.launching import collectives
from hp_deepspeed.model.layer_conditioning import ConditioningOutput
from hp_deepspeed.model.t5 import T5Model


STOP_CHECK_EVERY = 4
"""Tokens between two checks whether every sequence has finished (each check is a host sync)."""


@torch.no_grad()
def greedy_generate(
    model: T5Model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    conditioning: ConditioningOutput | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Greedy decode; returns [batch, 1 + generated] token ids (start token first)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = model.config
    encoder_hidden, encoder_mask = model.encode(input_ids, attention_mask, conditioning)
    batch = input_ids.shape[0]
    sequences = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    # Steps taken while some sequence was unfinished, counted on the device: the output is cut
    # to that length once at the end, as if decoding had stopped at the first all-finished step.
    taken = torch.zeros((), dtype=torch.long, device=input_ids.device)
    cache = model.new_cache() if use_cache else None
    # ZeRO-3 partitioned parameters are gathered collectively in every forward, so all ranks
    # must run the same number of steps: the stop decision is then agreed across ranks.
    sync_ranks = hasattr(next(model.parameters()), "ds_id")
    for step in range(1, max_new_tokens + 1):
        taken += ~finished.all()
        if cache is not None:
            logits = model.decode_step(sequences[:, -1:], encoder_hidden, encoder_mask, cache, conditioning)
        else:
            logits = model.decode(sequences, encoder_hidden, encoder_mask, conditioning=conditioning)[:, -1]
        next_token = logits.argmax(dim=-1)
        next_token = next_token.masked_fill(finished, config.pad_token_id)
        sequences = torch.cat([sequences, next_token[:, None]], dim=1)
        finished |= next_token == config.eos_token_id
        # Reading the flag waits for the device (a host sync): only every STOP_CHECK_EVERY
        # tokens; the steps after the last sequence finished only append padding, cut below.
        if step % STOP_CHECK_EVERY == 0 and all_finished(finished, sync_ranks):
            break
    return sequences[:, :1 + int(taken)]


def all_finished(finished: Tensor, sync_ranks: bool) -> bool:
    """True when every sequence has finished (on every rank when ``sync_ranks``: a collective)."""
    done = finished.all().to(torch.int32)
    if sync_ranks:
        return bool(collectives.all_reduce(done, "min").item())
    return bool(done.item())
