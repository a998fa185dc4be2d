"""Every way a checkpoint can be wrong fails with the file, the tensor and the shapes named."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from hp_deepspeed.model import WeightsError, T5Config, T5Model, load_hf_weights
from tests.model.helpers import load_ours

TENSOR = "encoder.block.1.layer.1.DenseReluDense.wo.weight"


def edited_checkpoint(src, dst, edit):
    """Copy the single-file checkpoint ``src`` to ``dst`` with ``edit(state_dict)`` applied."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def model(tiny_checkpoint):
    return T5Model(T5Config.from_pretrained(tiny_checkpoint("tiny-v1_0")))


def test_shape_mismatch_names_file_tensor_and_shapes(tiny_checkpoint, tmp_path, model):
    def shrink(state):
        state[TENSOR] = state[TENSOR][:, :-1].clone()

    folder = edited_checkpoint(tiny_checkpoint("tiny-v1_0"), tmp_path / "ckpt", shrink)
    with pytest.raises(WeightsError) as err:
        load_hf_weights(model, folder, zero3=False)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message and TENSOR in message
    assert "shape [32, 47]" in message and "expects [32, 48]" in message


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path, model):
    folder = edited_checkpoint(tiny_checkpoint("tiny-v1_0"), tmp_path / "ckpt", lambda s: s.pop(TENSOR))
    with pytest.raises(WeightsError, match=rf"{folder} lacks tensor {TENSOR} \(expected shape \[32, 48\]\)"):
        load_hf_weights(model, folder, zero3=False)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path, model):
    extra = "encoder.block.7.layer.0.SelfAttention.q.weight"

    def add(state):
        state[extra] = torch.zeros(32, 32)

    folder = edited_checkpoint(tiny_checkpoint("tiny-v1_0"), tmp_path / "ckpt", add)
    with pytest.raises(WeightsError, match=rf"model.safetensors: unexpected tensor {extra} \(shape \[32, 32\]\)"):
        load_hf_weights(model, folder, zero3=False)


def test_checkpoint_of_the_other_family_is_rejected(tiny_checkpoint, model):
    # v1.1 files hold wi_0/wi_1 where the v1.0 model has wi.
    with pytest.raises(WeightsError, match=r"lacks tensor encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight"):
        load_hf_weights(model, tiny_checkpoint("tiny-v1_1"), zero3=False)


def test_missing_files_are_named(tmp_path, tiny_checkpoint, model):
    with pytest.raises(WeightsError, match=rf"{tmp_path}: no weights found \(looked for model.safetensors.index.json"):
        load_hf_weights(model, tmp_path, zero3=False)
    with pytest.raises(WeightsError, match="not a checkpoint folder"):
        load_hf_weights(model, tmp_path / "absent", zero3=False)
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("tiny-v1_0", "sharded"), folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (folder / lost).unlink()
    with pytest.raises(WeightsError, match=rf"shard {lost} \(holding .+\) does not exist"):
        load_hf_weights(model, folder, zero3=False)


def test_zero3_flag_must_match_the_parameters(tiny_checkpoint, model):
    with pytest.raises(ValueError, match="zero3=True.*not partitioned"):
        load_hf_weights(model, tiny_checkpoint("tiny-v1_0"), zero3=True)


def test_hub_ids_go_through_snapshot_download(tiny_checkpoint, monkeypatch):
    """Offline stand-in for the hub: the right repository and file patterns are requested."""
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns):
        requested.append((repo_id, tuple(allow_patterns)))
        if repo_id == "nobody/absent":
            raise OSError("we are offline")
        return str(tiny_checkpoint("tiny-v1_0"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_ours(tiny_checkpoint("tiny-v1_0"))
    assert T5Config.from_pretrained("someone/tiny-t5") == model.config
    assert requested[-1] == ("someone/tiny-t5", ("config.json",))
    load_hf_weights(model, "someone/tiny-t5", zero3=False)
    assert requested[-1][0] == "someone/tiny-t5" and "*.safetensors" in requested[-1][1]
    load_hf_weights(model, "t5-small", zero3=False)  # preset names map to their hub repository
    assert requested[-1][0] == "google-t5/t5-small"
    with pytest.raises(WeightsError, match="'nobody/absent' is neither a local folder nor a preset.*OSError: we are offline"):
        load_hf_weights(model, "nobody/absent", zero3=False)


def _tied_v1_1_checkpoint(folder):
    """A v1.1 T5 saved by transformers 5 itself: its T5 always ties the head to the embedding, so
    ``save_pretrained`` writes ``shared.weight`` only (``scale_decoder_outputs: false`` marks v1.1)."""
    from safetensors import safe_open
    from transformers import T5ForConditionalGeneration

    from hp_deepspeed.testing.tiny_models import hf_config

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(hf_config(T5Config.from_pretrained("tiny-v1_1")))
    hf.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert "shared.weight" in handle.keys() and "lm_head.weight" not in handle.keys()
    return folder


def test_transformers_5_v1_1_with_a_tied_head_loads_as_transformers_loads_it(tmp_path):
    from transformers import T5ForConditionalGeneration

    from tests.model.helpers import padded_batch

    folder = _tied_v1_1_checkpoint(tmp_path / "ckpt")
    ours = load_ours(folder)
    hf = T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert not ours.config.tie_word_embeddings  # v1.1: unscaled, with its own lm_head parameter
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)
    input_ids, attention_mask, labels = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids, attention_mask, labels=labels).logits,
                                   hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits,
                                   atol=1e-5, rtol=1e-5)  # HF init: logits of a few units


def test_tied_members_fill_each_other_in_transformers_order(tiny_checkpoint, tmp_path):
    # Only an alias of the embedding left (old checkpoints): transformers ties shared.weight to it.
    def keep_alias_only(state):
        state["encoder.embed_tokens.weight"] = state.pop("shared.weight")

    folder = edited_checkpoint(tiny_checkpoint("tiny-v1_1"), tmp_path / "ckpt", keep_alias_only)
    original = load_file(tiny_checkpoint("tiny-v1_1") / "model.safetensors")
    ours = load_ours(folder)
    torch.testing.assert_close(ours.shared.weight, original["shared.weight"], atol=0, rtol=0)
    torch.testing.assert_close(ours.lm_head.weight, original["lm_head.weight"], atol=0, rtol=0)


def test_a_separate_head_under_a_tied_config_is_refused(tiny_checkpoint, tmp_path, model):
    # transformers keeps a head that differs from the embedding apart; a tied model cannot.
    def add_head(state):
        state["lm_head.weight"] = state["shared.weight"] + 1.0

    folder = edited_checkpoint(tiny_checkpoint("tiny-v1_0"), tmp_path / "ckpt", add_head)
    with pytest.raises(WeightsError, match="lm_head.weight differs from shared.weight"):
        load_hf_weights(model, folder, zero3=False)
    equal = edited_checkpoint(tiny_checkpoint("tiny-v1_0"), tmp_path / "equal",
                              lambda s: s.__setitem__("lm_head.weight", s["shared.weight"].clone()))
    load_hf_weights(model, equal, zero3=False)  # an equal copy (as .bin files hold) is the tie itself
