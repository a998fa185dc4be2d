"""An export loads in transformers as the model ``predict`` serves, for every conditioning variant.

Each variant's tiny model (random backbone, conditioning perturbed away from its initialisation
so that the prompts change the outputs) goes through the real ``export_run``, with the ZeRO
consolidation replaced by the model's own state dict. Then
``AutoModelForSeq2SeqLM.from_pretrained(export, trust_remote_code=True, hp_task=...)`` must give
the logits of the export loaded as ``predict`` loads it (max difference <= 1e-5) and, through
transformers' ``generate()``, the answers ``predict`` prints, for rows that carry no target.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch

from hp_deepspeed.checkpointing.layout import CONFIG, MARKER
from hp_deepspeed.config import load_config, save_config
from hp_deepspeed.data import BUNDLED_DATA_DIR, build_tasks, load_tokenizer
from hp_deepspeed.export import consolidate
from hp_deepspeed.export.predict import load_export, predict
from hp_deepspeed.model.conditioning import UNCONDITIONED_VARIANTS, Variant
from hp_deepspeed.model.hyperprompt_t5 import build_model
from hp_deepspeed.training.train_config import JobConfig

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "training" / "tiny_job.yaml"
TASK = "synthetic/first"
NEW_TOKENS = 6


def rows_without_targets(count: int = 6) -> list[dict]:
    lines = (BUNDLED_DATA_DIR / TASK / "validation.jsonl").read_text().splitlines()[:count]
    return [{k: v for k, v in json.loads(line).items() if k != "targets"} for line in lines]


def make_export(tmp_path: Path, variant: str, monkeypatch) -> Path:
    cfg = load_config(JobConfig, [str(TINY)], [f"conditioning.variant={variant}", f"run.dir={tmp_path}/run"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.conditioning, num_tasks=len(build_tasks(cfg.data)))
    with torch.no_grad():
        for param in (model.conditioning.parameters() if model.conditioning is not None else ()):
            param.add_(0.5 * torch.randn_like(param))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step = tmp_path / "run" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    save_config(cfg, step / CONFIG)
    (step / MARKER).write_text(json.dumps({"step": 3}))
    monkeypatch.setattr(consolidate, "consolidated_state_dict", lambda step_dir: state)
    return consolidate.export_run(tmp_path / "run", tmp_path / "export", checkpoint="step-3")


@pytest.mark.slow
@pytest.mark.parametrize("variant", typing.get_args(Variant))
def test_transformers_runs_the_export_as_predict_does_for_every_variant(tmp_path, monkeypatch, variant):
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    export = make_export(tmp_path, variant, monkeypatch)
    hf = AutoModelForSeq2SeqLM.from_pretrained(export, trust_remote_code=True, hp_task=TASK)
    ours, manifest, _ = load_export(export, torch.device("cpu"))
    task_id = next(t["task_id"] for t in manifest["tasks"] if t["name"] == TASK)
    tokenizer = load_tokenizer(export / "tokenizer")
    rows = rows_without_targets()
    # The MTL baseline was trained with the task's name before its inputs: the caller adds it.
    prefix = hf.config.hp_input_prefixes[TASK]
    assert (prefix == "first: ") == (variant == "mtl"), prefix
    enc = tokenizer([prefix + r["inputs"] for r in rows], padding=True, return_tensors="pt")
    decoder_ids = torch.randint(2, 50, (len(rows), 5))
    with torch.no_grad():
        expected = ours(enc["input_ids"], enc["attention_mask"], task_ids=torch.full((len(rows),), task_id),
                        decoder_input_ids=decoder_ids).logits
        got = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=decoder_ids).logits
        assert (got - expected).abs().max().item() <= 1e-5

        generated = hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
    answers = [p["text"] for p in predict(export, TASK, rows, device="cpu", max_new_tokens=NEW_TOKENS)]
    assert tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True) == answers

    if variant not in UNCONDITIONED_VARIANTS:  # the warning the export's READMEs give is true
        plain = T5ForConditionalGeneration.from_pretrained(export / "backbone").eval()
        with torch.no_grad():
            logits = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           decoder_input_ids=decoder_ids).logits
        assert (logits - expected).abs().max().item() > 1e-3
        assert "NOT this model" in (export / "README.md").read_text()
        assert "different" in (export / "backbone" / "README.md").read_text()


def test_an_unknown_task_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    export = make_export(tmp_path, "hyperprompt_global", monkeypatch)
    with pytest.raises(ValueError, match="hp_task='glue/cola' is not a task of this export"):
        AutoModelForSeq2SeqLM.from_pretrained(export, trust_remote_code=True, hp_task="glue/cola")
