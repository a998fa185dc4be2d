"""Tokenizer loading and cached tokenisation of a task's split.

``load_split`` reads a split (``sources``), preprocesses every row (``Task.preprocess``),
tokenises inputs and targets, and stores the token ids in ``cache_dir`` under a key made of
the file's sha256, the preprocessing fingerprint, the tokenizer's fingerprint, the maximum
lengths and the bad-row policy. A restart with the same key loads the ids without reading
the file through ``datasets`` or calling the tokenizer.

Once per job: the processes sharing a cache directory (the ranks of a node, or of the whole
job on a shared file system) take an exclusive ``flock`` on the cache file's ``.lock`` before
tokenising; the first tokenises, the others wait and then load its file. Cache files are
written to a temporary name and renamed, and the kernel drops the lock of a process that dies,
so a crash mid-write leaves no partial file and the next process tokenises again.

Tokenising calls the Rust tokenizer's ``encode_batch`` directly (the ``transformers`` call
wrapper around it costs about a third of the time); the ids are the same as
``tokenizer(texts, truncation=True, max_length=...)``. The tokenizer's fingerprint is computed
once per tokenizer object, not once per split.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hp_deepspeed.data.config import BUNDLED_TOKENIZER_DIR, DataConfig
from hp_deepspeed.data.sources import locate, read_split
from hp_deepspeed.data.tasks import DataError, MalformedRow, Task

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_TOKENIZE_CHUNK = 1024


def load_tokenizer(path: str | os.PathLike | None = None):
    """A transformers tokenizer from a local folder (None: the bundled one).

    T5's own tokenizer folder (``spiece.model`` + ``tokenizer_config.json``) and the folder
    written by scripts/train_tokenizer.py both load here; nothing is downloaded."""
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    folder = Path(path) if path is not None else BUNDLED_TOKENIZER_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} does not exist; point data.tokenizer at a folder with a saved "
            f"tokenizer (e.g. T5's), or create the bundled one with: python scripts/train_tokenizer.py"
        )
    if not any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"tokenizer folder {folder} holds no tokenizer.json, spiece.model or tokenizer_config.json"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies what the tokenizer does: its full serialisation when it is a fast tokenizer,
    otherwise its class, vocabulary and special tokens. Memoised per tokenizer object (and its
    vocabulary size, which adding tokens changes): serialising a tokenizer costs milliseconds
    to tens of milliseconds, once per split otherwise."""
    try:
        size, known = _FINGERPRINTS[tokenizer]
        if size == len(tokenizer):
            return known
    except (KeyError, TypeError):
        pass
    fingerprint = _fingerprint(tokenizer)
    with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced
        _FINGERPRINTS[tokenizer] = (len(tokenizer), fingerprint)
    return fingerprint


def _fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation and padding settings are call state (each call with truncation=True
        # stores its max_length there), not part of what a text tokenises to.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        blob = json.dumps(spec, sort_keys=True)
    else:
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    blob += json.dumps([str(tokenizer.eos_token), str(tokenizer.pad_token), tokenizer.pad_token_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TokenizedSplit:
    """Token ids of one split as ragged arrays (``ids[offsets[i]:offsets[i+1]]``), plus the
    references and target strings evaluation needs."""

    task: str
    split: str
    input_ids: np.ndarray
    input_offsets: np.ndarray
    target_ids: np.ndarray
    target_offsets: np.ndarray
    references: list[dict[str, Any]]
    target_texts: list[str]
    skipped: int

    def __len__(self) -> int:
        return len(self.input_offsets) - 1

    @property
    def input_lengths(self) -> np.ndarray:
        return np.diff(self.input_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        return np.diff(self.target_offsets)

    def inputs(self, i: int) -> np.ndarray:
        return self.input_ids[self.input_offsets[i] : self.input_offsets[i + 1]]

    def targets(self, i: int) -> np.ndarray:
        return self.target_ids[self.target_offsets[i] : self.target_offsets[i + 1]]


@contextlib.contextmanager
def _rust_encoder(tokenizer, max_length: int):
    """The tokenizer's Rust backend set to truncate at ``max_length`` and not to pad, as
    ``tokenizer(texts, truncation=True, max_length=max_length)`` sets it; its previous
    settings are restored afterwards."""
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    backend.enable_truncation(max_length)
    backend.no_padding()
    try:
        yield backend
    finally:
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def _ragged(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    ids: list[list[int]] = []
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        with _rust_encoder(tokenizer, max_length) as backend:
            for start in range(0, len(texts), _TOKENIZE_CHUNK):
                ids += [e.ids for e in backend.encode_batch(list(texts[start : start + _TOKENIZE_CHUNK]))]
    else:
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = list(texts[start : start + _TOKENIZE_CHUNK])
            ids += tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


@contextlib.contextmanager
def _exclusive(cache_file: Path, what: str):
    """An exclusive lock shared by every process using this cache directory (see the module
    docstring); released by the kernel if the holder dies."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_name(cache_file.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.debug("waiting for another process tokenising %s (%s)", what, cache_file)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save(path: Path, split: TokenizedSplit) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"references": split.references, "target_texts": split.target_texts, "skipped": split.skipped})
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    np.savez(
        tmp,
        input_ids=split.input_ids,
        input_offsets=split.input_offsets,
        target_ids=split.target_ids,
        target_offsets=split.target_offsets,
        meta=np.frombuffer(meta.encode(), dtype=np.uint8),
    )
    os.replace(tmp, path)


def _load(path: Path, task: str, split: str) -> TokenizedSplit:
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        return TokenizedSplit(
            task=task,
            split=split,
            input_ids=data["input_ids"],
            input_offsets=data["input_offsets"],
            target_ids=data["target_ids"],
            target_offsets=data["target_offsets"],
            references=meta["references"],
            target_texts=meta["target_texts"],
            skipped=meta["skipped"],
        )


def load_split(task: Task, split: str, cfg: DataConfig, tokenizer, training: bool) -> TokenizedSplit:
    """Tokenised examples of one split, from the cache when possible.

    Raises ``DataError`` for a missing file, a malformed row (unless skipped), a label outside
    the label set, or a split without any example."""
    path, content = locate(task, split)
    cache_dir = cfg.resolved_cache_dir()
    key = hashlib.sha256(
        json.dumps(
            [
                CACHE_FORMAT_VERSION,
                task.fingerprint,
                content,
                tokenizer_fingerprint(tokenizer),
                cfg.max_input_length,
                cfg.max_target_length,
                training,
                cfg.on_bad_row,
            ]
        ).encode()
    ).hexdigest()[:24]
    cache_file = cache_dir / "tokenized" / f"{task.name.replace('/', '__')}.{split}.{key}.npz"
    if cache_file.is_file():
        return _load(cache_file, task.name, split)
    with _exclusive(cache_file, f"{task.name} {split}"):
        if cache_file.is_file():  # written by the process that held the lock before us
            return _load(cache_file, task.name, split)
        return _tokenize(task, split, cfg, tokenizer, training, path, content, cache_dir, cache_file)


def _tokenize(task: Task, split: str, cfg: DataConfig, tokenizer, training: bool, path, content: str,
              cache_dir: Path, cache_file: Path) -> TokenizedSplit:
    raw = read_split(task, split, path, content, cfg.on_bad_row, cache_dir)
    inputs, targets, references = [], [], []
    skipped = raw.skipped
    for row, where in zip(raw.rows, raw.locations):
        try:
            examples = task.preprocess(row, training)
        except MalformedRow as err:
            if cfg.on_bad_row == "error" or not err.skippable:
                raise DataError(f"{where}: task {task.name}: {err}") from None
            logger.warning("skipping %s: task %s: %s", where, task.name, err)
            skipped += 1
            continue
        for example in examples:
            inputs.append(example.inputs)
            targets.append(example.targets)
            references.append(example.reference)
    if not inputs:
        raise DataError(f"task {task.name}: split {split!r} in {raw.description} has no examples ({skipped} skipped)")
    if skipped:
        logger.warning("task %s split %s: skipped %d malformed rows of %s", task.name, split, skipped, raw.description)
    input_ids, input_offsets = _ragged(tokenizer, inputs, cfg.max_input_length)
    target_ids, target_offsets = _ragged(tokenizer, targets, cfg.max_target_length)
    result = TokenizedSplit(
        task.name, split, input_ids, input_offsets, target_ids, target_offsets, references, targets, skipped
    )
    _save(cache_file, result)
    return result
