"""The bundled tokenizer, the script that trains it, and the tokenisation cache."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hp_deepspeed.data import BUNDLED_DATA_DIR, BUNDLED_TOKENIZER_DIR, TrainStream, build_eval_batches, build_tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import train_tokenizer  # noqa: E402  (a script, not a package module)


def test_bundled_tokenizer_follows_t5_conventions(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    ids = tokenizer("rte sentence1: Zoe, 42% [ok]?")["input_ids"]
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids  # every printable ASCII character is known
    assert len(tokenizer("gnu ant elk")["input_ids"]) == 4  # synthetic words are single pieces


def test_script_trains_a_tokenizer_transformers_loads(tmp_path):
    data = tmp_path / "data"
    for task in ("synthetic/copy", "glue/rte"):
        shutil.copytree(BUNDLED_DATA_DIR / task, data / task)
    train_tokenizer.train(data, tmp_path / "tok", vocab_size=200)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 1 and loaded.unk_token_id == 2
    text = "rte sentence1: ant bee"
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.slow
def test_script_reproduces_the_bundled_tokenizer(tmp_path):
    train_tokenizer.train(BUNDLED_DATA_DIR, tmp_path / "tok", vocab_size=1000)
    for name in ("spiece.model", "tokenizer.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tmp_path / "tok", BUNDLED_TOKENIZER_DIR)]
        assert digest[0] == digest[1], name


class CountingTokenizer:
    """Forwards to a tokenizer and counts calls that tokenise text."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_second_build_hits_the_cache(make_cfg, tokenizer, tmp_path):
    cfg = make_cfg(tasks=["glue/rte", "superglue/record"], cache_dir=str(tmp_path / "cache"))
    counting = CountingTokenizer(tokenizer)
    TrainStream(cfg, build_tasks(cfg), counting, 2)
    build_eval_batches(cfg, build_tasks(cfg), counting, 2)
    assert counting.calls == 8  # inputs and targets of 2 tasks x (train, validation)
    counting.calls = 0
    first = next(TrainStream(cfg, build_tasks(cfg), counting, 2))
    eval_sets = build_eval_batches(cfg, build_tasks(cfg), counting, 2)
    assert counting.calls == 0
    assert first["input_ids"].shape[0] == 2 and eval_sets[1].references[0]["answers"]
    # another maximum length is another cache entry
    cfg.max_input_length = 16
    TrainStream(cfg, build_tasks(cfg), counting, 2)
    assert counting.calls == 4
