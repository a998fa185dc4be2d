"""Local files in every supported format, explicit data files, and the offline hub path."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hp_deepspeed.data import CustomTaskConfig, DataError, TrainStream, build_eval_batches, build_tasks

ROWS = [{"text": f"row {i}", "label": i % 2} for i in range(4)]


def write(path, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_local_format(make_cfg, tokenizer, tmp_path, fmt):
    write(tmp_path / f"validation.{fmt}", fmt)
    task = CustomTaskConfig(name="my/t", path=str(tmp_path), input_template="t: {text}", label_words=["a", "b"],
                            train_split=None)
    cfg = make_cfg(custom_tasks=[task])
    (eval_set,) = build_eval_batches(cfg, build_tasks(cfg), tokenizer, 4)
    assert eval_set.references == [{"label": r["label"]} for r in ROWS]
    assert eval_set.compute_metrics(["a", "b", "a", "b"])["accuracy"] == 100.0


def test_explicit_data_files(make_cfg, tokenizer, tmp_path):
    write(tmp_path / "anything.jsonl", "jsonl")
    task = CustomTaskConfig(name="my/t", data_files={"train": str(tmp_path / "anything.jsonl")},
                            input_template="t: {text}", label_words=["a", "b"], eval_splits=[])
    cfg = make_cfg(custom_tasks=[task])
    assert TrainStream(cfg, build_tasks(cfg), tokenizer, 2).sizes == [4]
    task.data_files = {"train": str(tmp_path / "missing.jsonl")}
    with pytest.raises(DataError, match="missing.jsonl for split 'train' does not exist"):
        TrainStream(cfg, build_tasks(cfg), tokenizer, 2)


def test_hub_is_not_tried_offline(make_cfg, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = make_cfg(tasks=["glue/rte"], data_dir=str(tmp_path), hub=True)
    with pytest.raises(DataError, match="the hub is disabled: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set"):
        TrainStream(cfg, build_tasks(cfg), tokenizer, 2)
