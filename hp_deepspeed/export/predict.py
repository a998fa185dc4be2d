"""``hp-deepspeed predict``: answer a task's inputs from an export, on CPU or GPU, without DeepSpeed.

The backbone comes from ``EXPORT/backbone`` (our T5, which transformers also loads), the task
conditioning from ``EXPORT/prompts.safetensors`` (constants: no hypernetwork runs), and the
task's own preprocessing turns raw rows into model inputs, so rows look like the training files.
Rows without a label or target (test sets, a person's own inputs) are accepted for every task
kind: the answer fields are not used for prediction (``target_placeholders``).

Prints one JSON object per input row: ``{"row": i, "prediction": ..., "text": ...}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hp_deepspeed.checkpointing import CheckpointError
from hp_deepspeed.config import ConfigError, from_dict, read_yaml
from hp_deepspeed.data import DataConfig, DataError, build_tasks, load_tokenizer
from hp_deepspeed.data.sources import RawSplit, parse_json_lines, read_file
from hp_deepspeed.data.tasks import MalformedRow, float_postprocess
from hp_deepspeed.model.hf_checkpoint import load_hf_weights
from hp_deepspeed.model.conditioning import PrecomputedConditioning
from hp_deepspeed.model.hyperprompt_t5 import HyperPromptT5
from hp_deepspeed.model.t5 import T5Model
from hp_deepspeed.model.t5_config import T5Config
from hp_deepspeed.training.evaluation import generate_texts, rank_classify, tokenize_label_words
from hp_deepspeed.training.train_config import JobConfig

EXPORT_FORMAT = "hp_deepspeed.export/1"
"""The manifest format this module reads (and ``consolidate`` writes)."""


def read_export(export_dir: Path) -> tuple[dict, JobConfig]:
    """The manifest and job config of an export: cheap, so bad input fails before the model loads."""
    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{export_dir}: no export.json; expected a folder written by `hp-deepspeed export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err}); re-run `hp-deepspeed export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{manifest_path}: not an export manifest (expected format {EXPORT_FORMAT!r})")
    return manifest, from_dict(JobConfig, read_yaml(export_dir / "config.yaml"))


def load_export(export_dir: str | Path, device: torch.device) -> tuple[HyperPromptT5, dict, JobConfig]:
    export_dir = Path(export_dir)
    manifest, cfg = read_export(export_dir)
    backbone = T5Model(T5Config.from_pretrained(export_dir / "backbone"))
    load_hf_weights(backbone, export_dir / "backbone", zero3=False)
    prompts = export_dir / "prompts.safetensors"
    conditioning = PrecomputedConditioning.load(prompts) if prompts.is_file() else None
    model = HyperPromptT5(backbone, conditioning, kv_prompt_length=cfg.conditioning.kv_prompt_length)
    return model.to(device).eval(), manifest, cfg


def read_rows(path: str | None) -> RawSplit:
    """Rows of a .jsonl/.json/.csv/.parquet file, read as training reads its files (a bad row
    names its line), or JSON lines on stdin."""
    if path is None:
        return parse_json_lines(sys.stdin, "stdin")
    return read_file(Path(path), "", "error", DataConfig().resolved_cache_dir(), owner="--input ")


def target_placeholders(task, custom_tasks=()) -> dict[str, object]:
    """Field -> a valid stand-in for the fields that hold a task's answer (label or target text).

    Prediction reads only the input fields, but the task's preprocessor also builds the target
    and refuses a row without one; a row a person asks to predict has no answer. The stand-in is
    used where the field is absent, null, or -1 (the hub's unlabeled test rows)."""
    custom = {c.name: c for c in custom_tasks}
    if task.name in custom:
        cfg = custom[task.name]
        if cfg.label_words is not None:
            return {cfg.label_field: 0}
        return {cfg.target_field: 0.0 if task.postprocess is float_postprocess else ""}
    if task.name == "superglue/record":
        return {"answers": ["-"]}
    if task.name == "glue/stsb":
        return {"label": 0.0}
    if task.label_words is not None:
        return {"label": 0}
    return {"targets": ""}  # the text-to-text (synthetic) tasks


def model_inputs(task, rows: RawSplit, custom_tasks=()) -> list[str]:
    placeholders = target_placeholders(task, custom_tasks)
    inputs = []
    for row, where in zip(rows.rows, rows.locations):
        missing = {k: v for k, v in placeholders.items() if row.get(k, -1) in (-1, None)}
        if missing:
            row = {**row, **missing}  # unlabeled row: a valid answer that is not used
        try:
            examples = task.preprocess(row, False)
        except MalformedRow as err:
            raise DataError(f"{where}: task {task.name}: {err}") from None
        inputs.append(examples[0].inputs)  # ReCoRD expands per answer; the inputs are shared
    return inputs


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return device


def export_task(export_dir: Path, task_name: str):
    _, cfg = read_export(export_dir)
    tasks = {t.name: t for t in build_tasks(cfg.data)}
    if task_name not in tasks:
        raise DataError(f"--task {task_name}: not a task of this export; it has: {', '.join(tasks)}")
    return tasks[task_name], cfg


def predict(export_dir: str | Path, task_name: str, rows: RawSplit | list[dict], device: str = "auto",
            batch_size: int = 16, max_new_tokens: int = 16) -> list[dict]:
    if not isinstance(rows, RawSplit):
        rows = RawSplit(list(rows), [f"row {i}" for i in range(len(rows))], 0, "", "rows")
    # Every check that needs no model first: the task, then each row.
    task, job = export_task(Path(export_dir), task_name)
    texts = model_inputs(task, rows, job.data.custom_tasks)
    if not texts:
        raise DataError(f"{rows.description}: no rows to predict")
    dev = _device(device)
    model, _, cfg = load_export(export_dir, dev)
    tokenizer = load_tokenizer(Path(export_dir) / "tokenizer")
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
    export_task(Path(args.export), args.task)  # a wrong --export or --task fails before the rows are read
    rows = read_rows(args.input)
    results = predict(args.export, args.task, rows, device=args.device, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    for record in results:
        print(json.dumps(record))
    return 0
