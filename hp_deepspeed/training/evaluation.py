"""Evaluation under ZeRO-3: every rank in lockstep, per-task metrics, benchmark averages.

Classification tasks (those with label words) are scored T5-style by rank classification: the
log-likelihood of each label word as the target, the most likely word wins. That never produces
an invalid label and costs one forward per label word. Every other task is decoded greedily.

Lockstep: ``hp_deepspeed.data.build_eval_batches`` gives each rank the same number of batches
of the same size (padding with flagged dummy examples), rank classification runs a fixed number
of forwards per batch, and greedy decoding agrees its stopping step across ranks. Every forward
is therefore matched on every rank, which ZeRO-3's collective parameter gathers require.
"""

from __future__ import annotations

from typing import Mapping

import torch

from hp_deepspeed.data import EvalSet, Task, benchmark_average, build_eval_batches
from hp_deepspeed.data.config import DataConfig
from hp_deepspeed.launching import collectives
from hp_deepspeed.training.train_config import EvalConfig

LABEL_PAD = -100


@torch.no_grad()
def rank_classify(model, batch: dict, label_ids: torch.Tensor) -> torch.Tensor:
    """Index of the most likely label word per example: one forward per label word, scored by the
    summed log-likelihood of the word (T5's rank classification)."""
    scores = []
    for k in range(label_ids.shape[0]):
        labels = label_ids[k].to(batch["input_ids"].device).expand(batch["input_ids"].shape[0], -1)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=labels, task_ids=batch["task_ids"])
        scores.append(-out.example_loss_sum.float())
    return torch.stack(scores, dim=1).argmax(dim=1)


@torch.no_grad()
def generate_texts(model, tokenizer, batch: dict, max_new_tokens: int) -> list[str]:
    """Greedy decoding, detokenised (the start token dropped, special tokens skipped)."""
    tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["task_ids"],
                            max_new_tokens=max_new_tokens)
    return tokenizer.batch_decode(tokens[:, 1:], skip_special_tokens=True)


def tokenize_label_words(tokenizer, words) -> torch.Tensor:
    """[K, T] label-word targets (EOS appended by the tokenizer), -100 on padding."""
    ids = [tokenizer(w, add_special_tokens=True)["input_ids"] for w in words]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), LABEL_PAD, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
    return out


class Evaluator:
    def __init__(self, cfg: EvalConfig, data_cfg: DataConfig, tasks: list[Task], tokenizer, rank: int, world_size: int):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.tasks = tasks
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self._sets: list[EvalSet] | None = None
        self._label_ids = {t.name: tokenize_label_words(tokenizer, t.label_words) for t in tasks if t.label_words}

    @property
    def eval_sets(self) -> list[EvalSet]:
        """Built on first use: tokenising every eval split is wasted work for a run that dies early."""
        if self._sets is None:
            self._sets = build_eval_batches(
                self.data_cfg, self.tasks, self.tokenizer, self.cfg.batch_size, self.rank, self.world_size
            )
            if self.cfg.max_examples_per_task:
                self._sets = [self._truncate(s) for s in self._sets]
        return self._sets

    def _truncate(self, eval_set: EvalSet) -> EvalSet:
        """Keep the first batches holding about ``max_examples_per_task`` examples (all ranks the
        same count, so lockstep is kept); the metric then covers only the examples decoded."""
        per_batch = self.cfg.batch_size * self.world_size
        keep = max(1, -(-self.cfg.max_examples_per_task // per_batch))
        eval_set.batches = eval_set.batches[:keep]
        return eval_set

    # ------------------------------------------------------------------ a whole evaluation
    def evaluate(self, model, step: int) -> dict[str, float]:
        """``{"<eval set>/<metric>": value, ..., "glue_average": ...}``, identical on every rank."""
        device = next(model.parameters()).device
        scores: dict[str, dict[str, float]] = {}
        for eval_set in self.eval_sets:
            outputs: dict[int, str] = {}
            label_ids = self._label_ids.get(eval_set.task.name)
            for raw in eval_set.batches:
                batch = {k: v.to(device) for k, v in raw.items() if k != "example_index"}
                if label_ids is not None:
                    # One copy to the host per batch (int() per element would sync per example).
                    texts = [eval_set.task.label_words[i] for i in rank_classify(model, batch, label_ids).tolist()]
                else:
                    texts = generate_texts(model, self.tokenizer, batch, self.cfg.max_new_tokens)
                outputs.update((i, t) for i, t in zip(raw["example_index"].tolist(), texts) if i >= 0)
            outputs = self._merge_ranks(outputs)
            if self.cfg.max_examples_per_task:
                scores[eval_set.name] = self._partial_metrics(eval_set, outputs)
            else:
                scores[eval_set.name] = eval_set.compute_metrics(outputs)
        flat = {f"{name}/{metric}": value for name, values in scores.items() for metric, value in values.items()}
        flat.update(benchmark_average(scores, require_complete=False))
        return flat

    def _merge_ranks(self, outputs: dict[int, str]) -> dict[int, str]:
        merged: dict[int, str] = {}
        for part in collectives.all_gather_objects(outputs):  # [outputs] without a process group
            merged.update(part)
        return merged

    @staticmethod
    def _partial_metrics(eval_set: EvalSet, outputs: Mapping[int, str]) -> dict[str, float]:
        """Metrics over the decoded subset only (``max_examples_per_task``)."""
        indices = sorted(outputs)
        predictions = [eval_set.task.postprocess(outputs[i]) for i in indices]
        return eval_set.task.metrics(predictions, [eval_set.references[i] for i in indices])

    # ------------------------------------------------------------------ reporting
    @staticmethod
    def primary_scores(scores: Mapping[str, float]) -> dict[str, float]:
        """Per eval set, the number the best checkpoint is chosen by (``Task.primary_metric``)."""
        suffix = "/" + Task.primary_metric
        return {k[: -len(suffix)]: v for k, v in scores.items() if k.endswith(suffix)}

    @staticmethod
    def format_table(scores: Mapping[str, float], step: int) -> str:
        rows: dict[str, dict[str, float]] = {}
        averages = {}
        for key, value in scores.items():
            if "/" in key and key.rsplit("/", 1)[0]:
                name, metric = key.rsplit("/", 1)
                rows.setdefault(name, {})[metric] = value
            else:
                averages[key] = value
        width = max([len(n) for n in rows] + [12])
        lines = [f"evaluation at step {step}", f"{'task':<{width}}  metrics"]
        for name, metrics in rows.items():
            lines.append(f"{name:<{width}}  " + "  ".join(f"{m}={v:.2f}" for m, v in metrics.items()))
        for name, value in averages.items():
            lines.append(f"{name:<{width}}  {value:.2f}")
        return "\n".join(lines)
