"""``hp-deepspeed export``: a sharded ZeRO checkpoint -> a folder anyone can serve from.

    EXPORT/
      backbone/            config.json + model*.safetensors: the T5 weights only, without the conditioning
      config.json, modeling_hyperprompt.py   AutoModelForSeq2SeqLM.from_pretrained(EXPORT, trust_remote_code=True)
                           serves a task as predict does (export/hf_remote.py)
      conditioning.safetensors   the hypernetworks / prompt tables (to continue training elsewhere)
      prompts.safetensors  each task's conditioning precomputed (serving needs no hypernetwork)
      tokenizer/           the run's tokenizer
      export.json          tasks and their ids, the model and conditioning configs, the source step
      config.yaml          the job config the checkpoint was trained with

Runs in one process on the CPU, without DeepSpeed's engine: DeepSpeed's ``zero_to_fp32``
consolidates the fp32 master weights from the optimizer shards (``lazy_mode`` keeps only one
tensor materialised at a time, so an 11B export needs about one copy of the weights in RAM).

The folder is written whole or not at all (``output_folder.whole_folder``): into a fresh folder
next to EXPORT, renamed into place at the end; a non-empty EXPORT is refused unless
``overwrite``, and then replaced as a whole. Before the weights are loaded, the step folder's
``config.yaml`` is checked against the architecture its ``COMPLETE`` marker recorded, naming the
config key that differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from hp_deepspeed.checkpointing import CheckpointError, find_latest
from hp_deepspeed.checkpointing.layout import BEST, CONFIG, read_json, read_marker, step_tag
from hp_deepspeed.config import from_dict, read_yaml, to_dict
from hp_deepspeed.data import build_tasks, load_tokenizer
from hp_deepspeed.export.hf_remote import write_remote_code
from hp_deepspeed.export.predict import EXPORT_FORMAT
from hp_deepspeed.model.hf_checkpoint import save_hf_checkpoint
from hp_deepspeed.model.hyperprompt_t5 import HyperPromptT5, build_model
from hp_deepspeed.output_folder import whole_folder
from hp_deepspeed.training.train_config import JobConfig

log = logging.getLogger(__name__)


def resolve_checkpoint(run_dir: Path, spec: str) -> Path:
    """``auto`` (newest complete), ``best:<task>`` (the pinned best of a task) or a folder."""
    root = run_dir / "checkpoints"
    if spec == "auto":
        info = find_latest(root)
        if info is None:
            raise CheckpointError(f"{root}: no complete checkpoint to export")
        return info.path
    if spec.startswith("best:"):
        task = spec[len("best:"):]
        best = read_json(root / BEST) if (root / BEST).is_file() else {}
        if task not in best:
            raise CheckpointError(f"{root / BEST}: no best checkpoint recorded for task {task!r} (have {sorted(best)})")
        path = root / step_tag(int(best[task]["step"]))
    else:
        path = Path(spec) if Path(spec).is_absolute() or Path(spec).exists() else root / spec
    if read_marker(path) is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker)")
    return path


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of every parameter (frozen ones included) from a ZeRO checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def _differences(saved, current, prefix: str) -> list[str]:
    """Dotted keys where two JSON-like trees differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if saved == current else [f"{prefix}: config.yaml gives {current!r}, the weights were saved with {saved!r}"]


def check_config_matches_weights(step_dir: Path, cfg: JobConfig, tasks: list) -> None:
    """The architecture ``config.yaml`` describes must be the one recorded with the weights
    (the trainer's ``Trainer.architecture``), or loading them fails inside ``load_state_dict``."""
    from hp_deepspeed.model.builder import resolve_t5_config

    saved = (read_marker(step_dir) or {}).get("model_config")
    if not saved:
        return  # a checkpoint without the record: the shape check at load time still names the tensor
    t5 = {k: v for k, v in dataclasses.asdict(resolve_t5_config(cfg.model)).items() if k != "dropout_rate"}
    current = {"t5": t5, "conditioning": to_dict(cfg.conditioning), "tasks": [t.name for t in tasks]}
    problems = _differences(saved, current, "")
    if problems:
        # "t5.d_model" is the T5 config that model.name_or_path (and model.* overrides) resolve to.
        first = problems[0].replace("t5.", "model's T5 config ", 1).replace("tasks:", "data.tasks:", 1)
        raise CheckpointError(
            f"{step_dir / CONFIG}: does not match the weights of {step_dir.name}: {first}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def load_run_model(step_dir: Path) -> tuple[JobConfig, list, HyperPromptT5]:
    """The job config saved with ``step_dir``, its tasks, and the model with its consolidated
    weights (CPU)."""
    cfg = from_dict(JobConfig, read_yaml(step_dir / CONFIG))
    tasks = build_tasks(cfg.data)
    check_config_matches_weights(step_dir, cfg, tasks)
    model_cfg = dataclasses.replace(cfg.model, load_weights=False)  # the checkpoint has the weights
    model = build_model(model_cfg, cfg.conditioning, num_tasks=len(tasks))
    state = consolidated_state_dict(step_dir)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{step_dir}: the checkpoint does not fit the model of its own config.yaml: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    reshaped = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if reshaped:
        name = reshaped[0]
        raise CheckpointError(
            f"{step_dir}: the checkpoint does not fit the model of its own config.yaml: {name} has shape "
            f"{list(state[name].shape)} in the checkpoint, {list(own[name].shape)} in the model"
            + (f" (and {len(reshaped) - 1} more)" if len(reshaped) > 1 else ""))
    model.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return cfg, tasks, model.eval()


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "auto", overwrite: bool = False) -> Path:
    """Export ``checkpoint`` of ``run_dir`` to ``out_dir``, written whole (see the module docstring)."""
    run_dir, target = Path(run_dir), Path(out_dir)
    step_dir = resolve_checkpoint(run_dir, checkpoint)
    with whole_folder(target, overwrite, option="export --out") as staging:  # a read-only target fails here
        cfg, tasks, model = load_run_model(step_dir)
        write_export(staging, step_dir, cfg, tasks, model)
    log.info("exported %s to %s", step_dir, target)
    print(target)
    return target


def write_export(out_dir: Path, step_dir: Path, cfg: JobConfig, tasks: list, model: HyperPromptT5) -> None:
    """Every file of the export, into ``out_dir`` (the staging folder)."""
    save_hf_checkpoint(model.backbone, out_dir / "backbone")
    if model.conditioning is not None:
        save_file({k: v.contiguous() for k, v in model.conditioning.state_dict().items()},
                  str(out_dir / "conditioning.safetensors"))
        with torch.no_grad():
            model.precompute().save(out_dir / "prompts.safetensors")
    load_tokenizer(cfg.data.tokenizer).save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / "config.yaml").write_text((step_dir / CONFIG).read_text())
    manifest = {
        "format": EXPORT_FORMAT,
        "source": str(step_dir.resolve()),
        "step": int(read_marker(step_dir)["step"]),
        "tasks": [{"name": t.name, "task_id": t.task_id, "label_words": t.label_words} for t in tasks],
        "conditioning": to_dict(cfg.conditioning),
        "model": to_dict(cfg.model),
    }
    (out_dir / "export.json").write_text(json.dumps(manifest, indent=2))
    write_remote_code(out_dir, manifest)  # config.json + modeling file: transformers loads the export
