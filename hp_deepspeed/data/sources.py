"""Reading one split of one task: local files through ``datasets``, or the hub when allowed.

Local files (``<folder>/<split>.jsonl|json|csv|parquet`` or an explicit file) are loaded with
``datasets.load_dataset(<format>, data_files=...)``, which works offline. When ``datasets``
cannot parse a JSON-lines or CSV file (a malformed row breaks the whole Arrow conversion),
the file is re-read line by line with the standard library to name the bad line, or, under
``on_bad_row: skip``, to keep every good row. Each row carries its location (``file:line``
for JSON lines and CSV, ``file record i`` otherwise) so later errors can name it too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from hp_deepspeed.data.tasks import REGISTRY, DataError, Task

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RawSplit:
    """The rows of one split and where each came from."""

    rows: list[dict[str, Any]]
    locations: list[str]
    """Per row: ``path:line`` (JSON lines, CSV) or ``path record i`` (JSON, parquet, hub)."""
    skipped: int
    """Rows dropped as malformed while parsing (``on_bad_row: skip``)."""
    fingerprint: str
    """Identifies the content (sha256 of the file, or the hub dataset's fingerprint)."""
    description: str


def hub_disabled() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def find_split_file(task: Task, split: str) -> Path | None:
    """The local file of ``split``: ``data_files[split]`` or ``<folder>/<split>.<ext>``."""
    data_files = dict(task.source.data_files)
    if split in data_files:
        return Path(data_files[split])
    if task.source.folder is None:
        return None
    for ext in FORMATS:
        candidate = Path(task.source.folder) / f"{split}{ext}"
        if candidate.is_file():
            return candidate
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate(task: Task, split: str) -> tuple[Path | None, str]:
    """The local file of the split (None when it must come from the hub) and a content
    fingerprint; raises ``DataError`` naming every place looked at when there is none."""
    path = find_split_file(task, split)
    if path is not None:
        if not path.is_file():
            raise DataError(f"task {task.name}: data file {path} for split {split!r} does not exist")
        return path, file_sha256(path)
    if task.source.hub is not None and not hub_disabled():
        return None, f"hub:{task.source.hub}:{split}"
    where = task.source.folder or "(no folder)"
    hint = "" if task.source.hub is None else " (the hub is disabled: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)"
    if task.source.folder is not None and not Path(task.source.folder).is_dir():
        hint = f" (folder {where} does not exist){hint}"
    looked = f"looked for {where}/{split}.{{{','.join(e[1:] for e in FORMATS)}}}{hint}"
    if task.name in REGISTRY:
        fix = "set data.data_dir, or data.hub: true to download it"
    else:  # a custom task's files are where its own fields say, not under data.data_dir
        fix = (f"fix the path of custom task {task.name} (data.custom_tasks[].path), or name the file "
               f"in its data_files: {{{split}: FILE}}")
    raise DataError(f"task {task.name}: no file for split {split!r}: {looked}; {fix}")


def read_split(task: Task, split: str, path: Path | None, fingerprint: str, on_bad_row: str, cache_dir: Path) -> RawSplit:
    """All rows of a split; malformed rows raise ``DataError`` (``file:line: reason``) or, with
    ``on_bad_row == "skip"``, are dropped and counted."""
    if path is not None:
        try:
            return read_file(path, fingerprint, on_bad_row, cache_dir, owner=f"task {task.name}: ")
        except BadRow as err:
            raise DataError(f"{err} (set data.on_bad_row: skip to drop such rows)") from None
    with _quiet_datasets() as datasets:
        hub_path, hub_name = task.source.hub
        dataset = datasets.load_dataset(hub_path, hub_name, split=split, cache_dir=str(cache_dir / "hub"))
        rows = dataset.to_list()
        desc = f"{hub_path}/{hub_name}[{split}]"
        return RawSplit(rows, [f"{desc} record {i}" for i in range(len(rows))], 0, dataset._fingerprint, desc)


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets``, without its progress bars (one per file would bury the training log) and
    without its ERROR log lines on a parse failure: every failure is re-diagnosed here and
    reported once, naming the line, so its "row 1" of an Arrow block would only contradict it."""
    import datasets  # deferred: importing datasets costs about a second

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    # Child loggers (one per packaged module) inherit this level, so none of them logs.
    package_logger = logging.getLogger("datasets")
    level = package_logger.level
    package_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield datasets
    finally:
        package_logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def read_file(path: Path, fingerprint: str, on_bad_row: str, cache_dir: Path, owner: str = "") -> RawSplit:
    """All rows of one local .jsonl/.json/.csv/.parquet file: the one reader of training,
    evaluation and ``predict`` rows. ``owner`` prefixes errors that concern the whole file."""
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise DataError(f"{owner}{path} has an unsupported extension; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{owner}{path} does not exist")
    try:
        with _quiet_datasets() as datasets:
            dataset = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(cache_dir / "datasets"))
            rows = dataset.to_list()
    except Exception as err:  # noqa: BLE001 - every parse failure is re-diagnosed below
        if path.suffix == ".jsonl":
            return _read_jsonl(path, fingerprint, on_bad_row)
        if path.suffix == ".csv":
            check_utf8(path)  # no row of a CSV file can be read past a bad byte: not skippable
            return _read_csv(path, fingerprint, on_bad_row)
        if path.suffix == ".json":
            _diagnose_json(path)
        cause = err.__cause__ or err  # datasets wraps the parser's error in a generic one
        raise DataError(f"{owner}{path} cannot be read as {path.suffix[1:]}: {type(cause).__name__}: {cause}") from None
    if path.suffix == ".jsonl":
        locations = [f"{path}:{line}" for line in _nonblank_lines(path)]
    elif path.suffix == ".csv":
        starts = _csv_lines(path)
        if starts is None:  # pandas accepted a row with a wrong number of fields
            return _read_csv(path, fingerprint, on_bad_row)
        locations = [f"{path}:{line}" for line in starts]
    else:
        locations = [f"{path} record {i}" for i in range(len(rows))]
    if len(locations) != len(rows):  # e.g. a CSV the csv module splits differently from pandas
        locations = [f"{path} record {i}" for i in range(len(rows))]
    return RawSplit(rows, locations, 0, fingerprint, str(path))


def _diagnose_json(path: Path) -> None:
    """A .json file ``datasets`` could not read: name the line and column of a syntax error."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None


def check_utf8(path: Path) -> None:
    """``DataError`` naming the first line of ``path`` that is not UTF-8 text."""
    with path.open("rb") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{n}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") from None


def _nonblank_lines(path: Path) -> list[int]:
    with path.open(encoding="utf-8") as fh:
        return [n for n, line in enumerate(fh, start=1) if line.strip()]


def _csv_lines(path: Path) -> list[int] | None:
    """The line on which each data row of a CSV file starts (quoted fields may span lines);
    None when a row's number of fields differs from the header's."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        starts, line, width = [], reader.line_num + 1, None
        for i, values in enumerate(reader):
            if i == 0:
                width = len(values)
            elif len(values) != width:
                return None
            else:
                starts.append(line)
            line = reader.line_num + 1
        return starts


class BadRow(DataError):
    """A row that cannot be parsed; the message is ``file:line: reason``."""


def _bad(path: Path | str, line: int, reason: str, on_bad_row: str) -> None:
    if on_bad_row == "error":
        raise BadRow(f"{path}:{line}: {reason}")
    logger.warning("skipping %s:%d: %s", path, line, reason)


def _read_jsonl(path: Path, fingerprint: str, on_bad_row: str) -> RawSplit:
    with path.open("rb") as fh:
        return parse_json_lines(fh, str(path), on_bad_row, fingerprint)


def parse_json_lines(lines: Iterable[bytes | str], where: str, on_bad_row: str = "error", fingerprint: str = "") -> RawSplit:
    """JSON objects one per line (a file, or ``predict``'s stdin), each located as ``where:line``."""
    rows, locations, skipped = [], [], 0
    for n, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
            if not text.strip():
                continue
            row = json.loads(text.rstrip("\r\n"))  # so a column is a column of this line
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except UnicodeDecodeError as err:
            _bad(where, n, f"not UTF-8 text ({err.reason} at byte {err.start})", on_bad_row)
            skipped += 1
            continue
        except json.JSONDecodeError as err:
            _bad(where, n, f"malformed JSON row: {err.msg} at column {err.colno}", on_bad_row)
            skipped += 1
            continue
        except ValueError as err:
            _bad(where, n, f"malformed JSON row: {err}", on_bad_row)
            skipped += 1
            continue
        rows.append(row)
        locations.append(f"{where}:{n}")
    return RawSplit(rows, locations, skipped, fingerprint, where)


def _read_csv(path: Path, fingerprint: str, on_bad_row: str) -> RawSplit:
    rows, locations, skipped = [], [], 0
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty CSV file (no header)")
        line = reader.line_num + 1
        for values in reader:
            if len(values) != len(header):
                _bad(path, line, f"malformed CSV row: {len(values)} fields, header has {len(header)}", on_bad_row)
                skipped += 1
            else:
                rows.append({k: _csv_value(v) for k, v in zip(header, values)})
                locations.append(f"{path}:{line}")
            line = reader.line_num + 1
    return RawSplit(rows, locations, skipped, fingerprint, str(path))


def _csv_value(text: str) -> Any:
    """CSV cells are text; integers and floats are converted as ``datasets`` would infer them."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text
