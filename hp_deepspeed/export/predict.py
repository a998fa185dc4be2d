"""``hp-deepspeed predict``: answer a task's inputs from an export, on CPU or GPU, without DeepSpeed.

The backbone comes from ``EXPORT/backbone`` (our T5, which transformers also loads), the task
conditioning from ``EXPORT/prompts.safetensors`` (constants: no hypernetwork runs), and the
task's own preprocessing turns raw rows into model inputs, so rows look like the training files.
Rows without a label (test sets) are accepted: the label is not used for prediction.

Prints one JSON object per input row: ``{"row": i, "prediction": ..., "text": ...}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from hp_deepspeed.config import from_dict, read_yaml
from hp_deepspeed.data import DataError, build_tasks, load_tokenizer
from hp_deepspeed.data.sources import FORMATS
from hp_deepspeed.data.tasks import MalformedRow
from hp_deepspeed.model.hf_checkpoint import load_hf_weights
from hp_deepspeed.model.conditioning import PrecomputedConditioning
from hp_deepspeed.model.hyperprompt_t5 import HyperPromptT5
from hp_deepspeed.model.t5 import T5Model
from hp_deepspeed.model.t5_config import T5Config
from hp_deepspeed.training.evaluation import generate_texts, rank_classify, tokenize_label_words
from hp_deepspeed.training.train_config import JobConfig


def load_export(export_dir: str | Path, device: torch.device) -> tuple[HyperPromptT5, dict, JobConfig]:
    export_dir = Path(export_dir)
    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{export_dir}: no export.json; expected a folder written by `hp-deepspeed export`")
    manifest = json.loads(manifest_path.read_text())
    cfg = from_dict(JobConfig, read_yaml(export_dir / "config.yaml"))
    backbone = T5Model(T5Config.from_pretrained(export_dir / "backbone"))
    load_hf_weights(backbone, export_dir / "backbone", zero3=False)
    prompts = export_dir / "prompts.safetensors"
    conditioning = PrecomputedConditioning.load(prompts) if prompts.is_file() else None
    model = HyperPromptT5(backbone, conditioning, kv_prompt_length=cfg.conditioning.kv_prompt_length)
    return model.to(device).eval(), manifest, cfg


def read_rows(path: str | None) -> list[dict[str, Any]]:
    """Rows from a .jsonl/.json/.csv file, or JSON lines on stdin."""
    if path is None:
        return [json.loads(line) for line in sys.stdin if line.strip()]
    import datasets

    fmt = FORMATS.get(Path(path).suffix)
    if fmt is None:
        raise DataError(f"--input {path}: expected a .jsonl, .json, .csv or .parquet file")
    return datasets.load_dataset(fmt, data_files=str(path), split="train").to_list()


def model_inputs(task, rows: Iterable[dict], where: str) -> list[str]:
    inputs = []
    for i, row in enumerate(rows):
        if task.label_words is not None and row.get("label", -1) in (-1, None):
            row = {**row, "label": 0}  # unlabeled (test) row: any valid label; it is not used
        try:
            examples = task.preprocess(row, False)
        except MalformedRow as err:
            raise DataError(f"{where} row {i}: task {task.name}: {err}") from None
        inputs.append(examples[0].inputs)  # ReCoRD expands per answer; the inputs are shared
    return inputs


def predict(export_dir: str | Path, task_name: str, rows: list[dict], device: str = "auto",
            batch_size: int = 16, max_new_tokens: int = 16, where: str = "input") -> list[dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model, manifest, cfg = load_export(export_dir, dev)
    tasks = {t.name: t for t in build_tasks(cfg.data)}
    if task_name not in tasks:
        raise DataError(f"task {task_name!r} is not a task of this export; it has: {', '.join(tasks)}")
    task = tasks[task_name]
    tokenizer = load_tokenizer(Path(export_dir) / "tokenizer")
    texts = model_inputs(task, rows, where)
    label_ids = tokenize_label_words(tokenizer, task.label_words) if task.label_words else None
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=cfg.data.max_input_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
                 "task_ids": torch.full((len(chunk),), task.task_id, dtype=torch.long, device=dev)}
        if label_ids is not None:
            outs = [task.label_words[int(i)] for i in rank_classify(model, batch, label_ids)]
        else:
            outs = generate_texts(model, tokenizer, batch, max_new_tokens)
        for offset, text in enumerate(outs):
            results.append({"row": start + offset, "text": text, "prediction": task.postprocess(text)})
    return results


def predict_main(args) -> int:
    rows = read_rows(args.input)
    results = predict(args.export, args.task, rows, device=args.device, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, where=args.input or "stdin")
    for record in results:
        print(json.dumps(record))
    return 0
