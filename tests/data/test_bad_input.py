"""Bad input: malformed rows (error with file and line, or skipped and counted), unknown
tasks, empty tasks, labels outside the label set, missing files and tokenizers."""

from __future__ import annotations

import json
import re

import pytest

from hp_deepspeed.data import CustomTaskConfig, DataError, TrainStream, build_eval_batches, build_tasks, load_tokenizer

GOOD = [{"text": f"row {i}", "label": i % 2} for i in range(5)]


def custom(folder, **kwargs):
    return CustomTaskConfig(name="my/task", path=str(folder), input_template="classify: {text}",
                            label_words=["no", "yes"], **kwargs)


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def train(make_cfg, tokenizer, folder, **cfg):
    config = make_cfg(custom_tasks=[custom(folder)], **cfg)
    return TrainStream(config, build_tasks(config), tokenizer, micro_batch_size=2)


def test_malformed_json_line_names_file_and_line(make_cfg, tokenizer, tmp_path):
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(3, '{"text": "broken", "label": ')
    write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.jsonl'}:4: malformed JSON row")):
        train(make_cfg, tokenizer, tmp_path)
    s = train(make_cfg, tokenizer, tmp_path, on_bad_row="skip")
    assert s.skipped == {"my/task": 1} and s.sizes == [5]


def test_missing_field_names_file_and_line(make_cfg, tokenizer, tmp_path):
    lines = [json.dumps(r) for r in GOOD] + ["", json.dumps({"txt": "typo", "label": 1})]
    write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.jsonl'}:7: task my/task: missing field 'text'")):
        train(make_cfg, tokenizer, tmp_path)
    s = train(make_cfg, tokenizer, tmp_path, on_bad_row="skip")
    assert s.skipped == {"my/task": 1} and s.sizes == [5]


def test_wrong_type_in_registry_row(make_cfg, tokenizer, tmp_path):
    row = {"sentence1": "a", "sentence2": 5, "label": 0, "idx": 0}
    (tmp_path / "glue" / "rte").mkdir(parents=True)
    write_jsonl(tmp_path / "glue" / "rte" / "train.jsonl", [json.dumps(row)])
    config = make_cfg(tasks=["glue/rte"], data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"train.jsonl:1: task glue/rte: field 'sentence2' should be a string"):
        TrainStream(config, build_tasks(config), tokenizer, 2)


def test_malformed_csv_row(make_cfg, tokenizer, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nrow a,0\nrow b,1,extra\nrow c,1\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.csv'}:3: malformed CSV row")):
        train(make_cfg, tokenizer, tmp_path)
    assert train(make_cfg, tokenizer, tmp_path, on_bad_row="skip").skipped == {"my/task": 1}


def test_label_outside_label_set_is_an_error_even_when_skipping(make_cfg, tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in GOOD] + [json.dumps({"text": "x", "label": 2})])
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=r"train.jsonl:6: task my/task: label 2 is outside the label set"):
            train(make_cfg, tokenizer, tmp_path, on_bad_row=policy)


def test_empty_task(make_cfg, tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ['{"text": 1'])
    with pytest.raises(DataError, match="split 'train' .* has no examples \\(1 skipped\\)"):
        train(make_cfg, tokenizer, tmp_path, on_bad_row="skip")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match="no examples"):
        train(make_cfg, tokenizer, tmp_path)


def test_missing_split_file_lists_where_it_looked(make_cfg, tokenizer, tmp_path):
    config = make_cfg(tasks=["glue/rte"], data_dir=str(tmp_path))
    with pytest.raises(DataError, match=re.escape(f"no file for split 'validation': looked for {tmp_path}/glue/rte/validation.{{jsonl,json,csv,parquet}}")):
        build_eval_batches(config, build_tasks(config), tokenizer, 2)


def test_unknown_task_lists_known_ones(make_cfg):
    with pytest.raises(DataError, match=r"unknown task 'superglue/wsc273'; known tasks: .*superglue/wsc, superglue/axb"):
        build_tasks(make_cfg(tasks=["superglue/wsc273"]))


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer folder {tmp_path / 'nope'} does not exist")):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_fractional_label_is_named_not_its_neighbours(make_cfg, tokenizer, tmp_path):
    # one 0.5 makes datasets read the whole column as floats; 0.0 and 1.0 stay valid labels
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in GOOD] + [json.dumps({"text": "x", "label": 0.5})])
    with pytest.raises(DataError, match=r"train.jsonl:6: task my/task: label 0.5 is outside the label set"):
        train(make_cfg, tokenizer, tmp_path)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_bad_row_is_reported_once_with_one_row_number(make_cfg, tokenizer, tmp_path, split, capfd, caplog):
    """datasets' reader fails on the whole Arrow block and logs ERROR lines about its "row 1";
    the user must see only our message, naming the line."""
    lines = [json.dumps(r) for r in GOOD]
    write_jsonl(tmp_path / "train.jsonl", lines)
    write_jsonl(tmp_path / "validation.jsonl", lines)
    write_jsonl(tmp_path / f"{split}.jsonl", lines[:3] + ["not json"] + lines[3:])
    caplog.set_level("DEBUG")
    config = make_cfg(custom_tasks=[custom(tmp_path)])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / split}.jsonl:4: malformed JSON row: Expecting value at column 1")):
        if split == "train":
            TrainStream(config, build_tasks(config), tokenizer, micro_batch_size=2)
        else:
            build_eval_batches(config, build_tasks(config), tokenizer, 2)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    assert "ERROR" not in capfd.readouterr().err


def test_bad_rows_of_a_json_array_file_are_named_by_record(make_cfg, tokenizer, tmp_path):
    rows = GOOD[:2] + [{"txt": "typo", "label": 1}] + GOOD[2:]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.json'} record 2: task my/task: missing field 'text'")):
        train(make_cfg, tokenizer, tmp_path)
    s = train(make_cfg, tokenizer, tmp_path, on_bad_row="skip")
    assert s.skipped == {"my/task": 1} and s.sizes == [5]


def test_a_json_file_that_does_not_parse_is_named(make_cfg, tokenizer, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(GOOD)[:-20])
    for policy in ("error", "skip"):  # no row can be told apart in a broken array: never skipped
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.json'}:1:") + r"\d+: malformed JSON"):
            train(make_cfg, tokenizer, tmp_path, on_bad_row=policy)


def test_bad_rows_of_a_parquet_file_are_named_by_record(make_cfg, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = GOOD[:3] + [{"text": None, "label": 1}] + GOOD[3:]  # a null where a string belongs
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.parquet'} record 3: task my/task: missing field 'text'")):
        train(make_cfg, tokenizer, tmp_path)
    s = train(make_cfg, tokenizer, tmp_path, on_bad_row="skip")
    assert s.skipped == {"my/task": 1} and s.sizes == [5]


def test_bad_rows_skipped_in_an_eval_split_keep_references_aligned(make_cfg, tokenizer, tmp_path):
    """Each kept eval example's reference is its own row's label: the skipped rows shift no one."""
    rows = [{"text": f"row {i}", "label": (i // 2) % 2} for i in range(9)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"text": "broken'  # malformed JSON
    lines[6] = json.dumps({"txt": "typo", "label": 1})  # missing field
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in GOOD])
    write_jsonl(tmp_path / "validation.jsonl", lines)
    config = make_cfg(custom_tasks=[custom(tmp_path)], on_bad_row="skip")
    tasks = build_tasks(config)
    kept = [r for i, r in enumerate(rows) if i not in (2, 6)]
    seen = {}
    for rank in range(2):
        (eval_set,) = build_eval_batches(config, tasks, tokenizer, 2, rank, 2)
        assert len(eval_set) == len(kept)
        for batch in eval_set.batches:
            for index, ids, labels in zip(batch["example_index"].tolist(), batch["input_ids"], batch["labels"]):
                if index >= 0:
                    seen[index] = (tokenizer.decode(ids, skip_special_tokens=True),
                                   tokenizer.decode(labels[labels != -100], skip_special_tokens=True))
    assert sorted(seen) == list(range(len(kept)))
    for index, (text, target) in seen.items():
        row = kept[index]
        assert text == f"classify: {row['text']}" and target == ["no", "yes"][row["label"]], index
        assert eval_set.references[index]["label"] == row["label"], index
    outputs = {i: target for i, (_, target) in seen.items()}  # a model that is always right
    assert eval_set.compute_metrics(outputs)["accuracy"] == 100.0
