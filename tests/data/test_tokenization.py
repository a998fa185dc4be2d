"""The bundled tokenizer, the script that trains it, and the tokenisation cache."""

from __future__ import annotations

import hashlib
import os
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
    """Forwards to a tokenizer and counts the texts' tokenisations: calls of the tokenizer and
    first batches of its Rust backend per split column (``encode_batch`` of the first chunk)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.backend_tokenizer = CountingBackend(self, inner.backend_tokenizer)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class CountingBackend:
    def __init__(self, owner, inner):
        self.owner, self.inner = owner, inner

    def enable_truncation(self, *args, **kwargs):
        self.owner.calls += 1  # once per tokenised column, however many chunks it has
        return self.inner.enable_truncation(*args, **kwargs)

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


def test_tokenising_through_the_rust_backend_gives_the_tokenizers_own_ids_and_leaves_it_as_it_was(tokenizer):
    from hp_deepspeed.data.tokenization import _ragged

    texts = ["a short one", "", "word " * 300, "the river castle teacher found"] * 600  # > one chunk
    flat, offsets = _ragged(tokenizer, texts, max_length=37)
    want = tokenizer(texts, truncation=True, max_length=37)["input_ids"]
    assert [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == want
    assert max(map(len, want)) == 37 and flat.dtype.name == "int32"
    tokenizer.backend_tokenizer.no_truncation()
    _ragged(tokenizer, texts[:3], max_length=5)
    assert tokenizer.backend_tokenizer.truncation is None and tokenizer.backend_tokenizer.padding is None


def test_the_tokenizer_fingerprint_is_computed_once_per_tokenizer(tokenizer, monkeypatch):
    from hp_deepspeed.data import tokenization

    calls = []
    real = tokenization._fingerprint
    monkeypatch.setattr(tokenization, "_fingerprint", lambda t: calls.append(t) or real(t))
    tokenization._FINGERPRINTS.pop(tokenizer, None)
    first = tokenization.tokenizer_fingerprint(tokenizer)
    assert tokenization.tokenizer_fingerprint(tokenizer) == first and len(calls) == 1
    assert first == real(tokenizer)


def _load_in_child(cfg, queue):
    from hp_deepspeed.data import build_tasks, load_tokenizer
    from hp_deepspeed.data.tokenization import load_split

    counting = CountingTokenizer(load_tokenizer(None))
    task = build_tasks(cfg)[0]
    split = load_split(task, task.train_split, cfg, counting, training=True)
    queue.put((counting.calls, split.input_ids.tolist()))


def _die_holding_the_lock(cache_file):
    from hp_deepspeed.data.tokenization import _exclusive

    with _exclusive(cache_file, "test"):
        (cache_file.parent / "partial.tmp.npz").write_bytes(b"half a file")
        os._exit(1)  # a crash mid-write: no cleanup, no unlock


def test_processes_sharing_a_cache_tokenise_a_split_once_and_a_crash_mid_write_is_recovered(make_cfg, tmp_path):
    import multiprocessing

    from hp_deepspeed.data import build_tasks, load_tokenizer
    from hp_deepspeed.data.tokenization import load_split

    cfg = make_cfg(tasks=["glue/rte"], cache_dir=str(tmp_path / "cache"))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_load_in_child, args=(cfg, queue)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert sorted(calls for calls, _ in results) == [0, 0, 2]  # inputs and targets, by one process
    assert all(ids == results[0][1] for _, ids in results)

    # A process that dies holding the lock (mid-write) blocks no one and leaves no cache file.
    crashed_cfg = make_cfg(tasks=["glue/rte"], cache_dir=str(tmp_path / "crashed"))
    task = build_tasks(crashed_cfg)[0]
    written = next((tmp_path / "cache" / "tokenized").glob("glue__rte.train.*.npz"))  # the same key
    cache_file = tmp_path / "crashed" / "tokenized" / written.name
    dying = context.Process(target=_die_holding_the_lock, args=(cache_file,))
    dying.start()
    dying.join(timeout=60)
    assert dying.exitcode == 1
    counting = CountingTokenizer(load_tokenizer(None))
    split = load_split(task, task.train_split, crashed_cfg, counting, training=True)
    assert counting.calls == 2 and split.input_ids.tolist() == results[0][1]
    assert cache_file.is_file() and (cache_file.parent / "partial.tmp.npz").is_file()
