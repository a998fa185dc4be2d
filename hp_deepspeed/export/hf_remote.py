"""The export as a transformers model: ``AutoModelForSeq2SeqLM.from_pretrained(EXPORT, trust_remote_code=True)``.

``write_remote_code(out_dir, manifest)`` (called by ``export_run``) adds to an export folder:

    config.json              model_type hyperprompt_t5, the tasks and their ids, the task served
                             (``hp_task``, the first task unless given), and ``auto_map`` naming
    modeling_hyperprompt.py  a copy of this file: the config and model classes below
    README.md                how to load it, and why ``backbone/`` alone is not the model
    backbone/README.md       the same warning beside the plain T5 weights

The model class loads the export with ``hp_deepspeed.export.predict.load_export`` (the backbone
plus each task's precomputed prompts, adapters or soft tokens) and runs it through the same code
as ``hp-deepspeed predict``, so logits and greedy ``generate()`` output are those of ``predict``
for every conditioning variant. It therefore needs the ``hp_deepspeed`` package importable (it
re-implements nothing); what it adds is transformers' interface: ``from_pretrained``,
``forward`` returning ``Seq2SeqLMOutput``, ``get_encoder`` and ``generate()``.

    model = AutoModelForSeq2SeqLM.from_pretrained("exports/x", trust_remote_code=True, hp_task="glue/rte")
    out = model.generate(**tokenizer(["rte sentence1: ... sentence2: ..."], return_tensors="pt"), max_new_tokens=8)

What it does not do: an incremental key/value cache (``generate`` recomputes the decoder prefix
each step, which gives the same tokens as ``predict``'s cached decoding), beam search over
several tasks at once (one task per loaded model), or training.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

MODEL_TYPE = "hyperprompt_t5"
MODELING_FILE = "modeling_hyperprompt.py"


class HyperPromptT5Config(PretrainedConfig):
    """The export's tasks and the one this model serves (``hp_task``), plus T5's token ids."""

    model_type = MODEL_TYPE

    def __init__(self, hp_task: str | None = None, hp_tasks: dict[str, int] | None = None, vocab_size: int = 32128,
                 d_model: int = 512, decoder_start_token_id: int = 0, pad_token_id: int = 0, eos_token_id: int = 1,
                 hp_input_prefixes: dict[str, str] | None = None, **kwargs):
        self.hp_task = hp_task
        self.hp_tasks = dict(hp_tasks or {})
        # The text training put before each task's inputs (the MTL baseline's task name; empty for
        # the conditioned variants): token ids in, so the caller adds it, as predict does.
        self.hp_input_prefixes = dict(hp_input_prefixes or {})
        self.vocab_size = vocab_size
        self.d_model = d_model
        kwargs.setdefault("is_encoder_decoder", True)
        super().__init__(decoder_start_token_id=decoder_start_token_id, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id, **kwargs)

    def task_id(self) -> int:
        if self.hp_task not in self.hp_tasks:
            raise ValueError(f"hp_task={self.hp_task!r} is not a task of this export; it has: {', '.join(self.hp_tasks)}")
        return int(self.hp_tasks[self.hp_task])


@dataclass
class HyperPromptEncoderOutput(BaseModelOutput):
    """The encoder's output and its attention mask, which covers prompt-tuning's soft input tokens too."""

    attention_mask: torch.Tensor | None = None


class _Encoder(nn.Module):
    """What ``get_encoder()`` returns: the conditioned encoder of the owning model."""

    def __init__(self, owner: "HyperPromptT5ForConditionalGeneration"):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds the weights

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> HyperPromptEncoderOutput:
        owner = self._owner
        hidden, mask = owner.model.backbone.encode(
            input_ids, attention_mask, owner.conditioning(input_ids.shape[0], input_ids.device))
        return HyperPromptEncoderOutput(last_hidden_state=hidden, attention_mask=mask)


class HyperPromptT5ForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """A HyperPrompt export serving one of its tasks through transformers' interface."""

    config_class = HyperPromptT5Config
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: HyperPromptT5Config, model: nn.Module | None = None):
        super().__init__(config)
        self.model = model
        self._encoder = _Encoder(self)
        self.generation_config.use_cache = False  # no transformers cache: the prefix is recomputed

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, hp_task=None, **kwargs):
        from hp_deepspeed.export.predict import load_export

        path = Path(pretrained_model_name_or_path)
        if config is None:
            config = HyperPromptT5Config.from_pretrained(path)
        if hp_task is not None:
            config.hp_task = hp_task
        config.task_id()  # an unknown task fails before the weights load
        model, _, _ = load_export(path, torch.device("cpu"))
        return cls(config, model).eval()

    def get_encoder(self):
        return self._encoder

    def conditioning(self, batch: int, device):
        task_ids = torch.full((batch,), self.config.task_id(), dtype=torch.long, device=device)
        return self.model.condition(task_ids)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, labels=None, **kwargs) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            encoder_outputs = self._encoder(input_ids, attention_mask)
        hidden = encoder_outputs[0]
        mask = getattr(encoder_outputs, "attention_mask", None)
        if mask is None:
            mask = attention_mask if attention_mask is not None else hidden.new_ones(hidden.shape[:2], dtype=torch.long)
        backbone = self.model.backbone
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = backbone.shift_right(labels)
        cond = self.conditioning(hidden.shape[0], hidden.device)
        logits = backbone.decode(decoder_input_ids, hidden, mask, decoder_attention_mask, cond)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=hidden)

    def prepare_inputs_for_generation(self, input_ids, encoder_outputs=None, attention_mask=None, **kwargs):
        return {"decoder_input_ids": input_ids, "encoder_outputs": encoder_outputs, "attention_mask": attention_mask}


_README = """# HyperPrompt export

This folder is the model: the T5 backbone *and* each task's conditioning (prompts, adapters or
soft input tokens in `prompts.safetensors`). Load it with

    hp-deepspeed predict --export {folder} --task TASK --input rows.jsonl

or through transformers (needs the `hp_deepspeed` package installed):

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained("{folder}", trust_remote_code=True, hp_task="{task}")
    tokenizer = AutoTokenizer.from_pretrained("{folder}/tokenizer")

Tasks: {tasks}. Both give the same logits and the same greedy generations.

`backbone/` alone is NOT this model: {backbone_note}
"""

_BACKBONE_NOTE = {
    True: ("it holds the T5 weights without the task conditioning (variant `{variant}`). Loaded as a "
           "plain T5 (`T5ForConditionalGeneration.from_pretrained(\"backbone\")`) it gives different "
           "logits and different answers than this model, because the prompts are missing."),
    False: ("this run trained without conditioning modules (variant `{variant}`), so `backbone/` loaded "
            "as a plain T5 gives the same outputs as this model."),
}


def write_remote_code(out_dir: Path, manifest: dict, task: str | None = None) -> None:
    """Add the transformers entry point to an export folder (see the module docstring)."""
    from hp_deepspeed.model.conditioning import UNCONDITIONED_VARIANTS

    out_dir = Path(out_dir)
    backbone = json.loads((out_dir / "backbone" / "config.json").read_text())
    tasks = {t["name"]: int(t["task_id"]) for t in manifest["tasks"]}
    config = HyperPromptT5Config(
        hp_task=task or next(iter(tasks)), hp_tasks=tasks, vocab_size=backbone["vocab_size"],
        d_model=backbone["d_model"], decoder_start_token_id=backbone.get("decoder_start_token_id", 0),
        pad_token_id=backbone.get("pad_token_id", 0), eos_token_id=backbone.get("eos_token_id", 1),
        hp_input_prefixes=_input_prefixes(out_dir),
    )
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.HyperPromptT5Config",
                       "AutoModelForSeq2SeqLM": f"{MODELING_FILE[:-3]}.HyperPromptT5ForConditionalGeneration"}
    config.save_pretrained(out_dir)
    shutil.copyfile(Path(__file__), out_dir / MODELING_FILE)
    variant = manifest.get("conditioning", {}).get("variant", "none")
    note = _BACKBONE_NOTE[variant not in UNCONDITIONED_VARIANTS].format(variant=variant)
    if any(config.hp_input_prefixes.values()):
        note += (" Inputs carry their task's text prefix, as in training (`config.hp_input_prefixes`: "
                 + ", ".join(f"{t} -> {p!r}" for t, p in config.hp_input_prefixes.items()) + ").")
    (out_dir / "README.md").write_text(_README.format(folder=out_dir, task=config.hp_task,
                                                      tasks=", ".join(tasks), backbone_note=note))
    (out_dir / "backbone" / "README.md").write_text(
        f"# T5 backbone only\n\nThese are the T5 weights of the export in `..`; {note}\n"
        "Load the export folder itself (see ../README.md).\n\n"
        "transformers 5 warns, when it loads this folder as T5, that its mapping ties `shared.weight` to "
        "`lm_head.weight` and asks for `tie_word_embeddings=False`, which config.json already says. The "
        "warning is about T5's class defaults, not this checkpoint: as it says, the two matrices are loaded "
        "separately, untied, as trained.\n")


def _input_prefixes(out_dir: Path) -> dict[str, str]:
    from hp_deepspeed.config import from_dict, read_yaml
    from hp_deepspeed.data.tasks import input_prefixes
    from hp_deepspeed.training.train_config import JobConfig

    return input_prefixes(from_dict(JobConfig, read_yaml(out_dir / "config.yaml")).data)
