"""Trainer pieces on the CPU with small fakes: rank classification, metric plumbing, the CLI's
early rejection of bad input."""

import io
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hp_deepspeed.cli import main
from hp_deepspeed.config import ConfigError
from hp_deepspeed.training.evaluation import Evaluator, rank_classify, tokenize_label_words
from hp_deepspeed.training.trainer import WindowStats, check_vocabulary, progress_bar

REPO = Path(__file__).resolve().parents[2]


class FakeTokenizer:
    """Words map to fixed ids; EOS (1) is appended like T5's tokenizer does."""

    ids = {"yes": [5], "no": [6, 7]}

    def __call__(self, word, add_special_tokens=True):
        return {"input_ids": self.ids[word] + ([1] if add_special_tokens else [])}

    def __len__(self):
        return 100


class FakeScorer(torch.nn.Module):
    """Loss of a target = its first token id times the example's `bias`: a known ranking."""

    def forward(self, input_ids, attention_mask, labels, task_ids):
        bias = input_ids[:, 0].float()
        first = labels[:, 0].float()
        return SimpleNamespace(example_loss_sum=first * bias)


def test_label_words_are_tokenized_with_eos_and_padded():
    ids = tokenize_label_words(FakeTokenizer(), ["yes", "no"])
    assert ids.tolist() == [[5, 1, -100], [6, 7, 1]]


def test_rank_classification_picks_the_most_likely_word():
    label_ids = tokenize_label_words(FakeTokenizer(), ["yes", "no"])
    # bias +1: "yes" (5) has the lower loss; bias -1: "no" (6) has the lower loss (-6 < -5).
    batch = {"input_ids": torch.tensor([[1, 0], [-1, 0]]), "attention_mask": torch.ones(2, 2),
             "task_ids": torch.zeros(2, dtype=torch.long)}
    assert rank_classify(FakeScorer(), batch, label_ids).tolist() == [0, 1]


def test_primary_scores_and_table():
    scores = {"glue/rte/accuracy": 60.0, "glue/rte/score": 60.0, "superglue/cb/macro_f1": 40.0,
              "superglue/cb/score": 45.0, "glue_average": 60.0}
    assert Evaluator.primary_scores(scores) == {"glue/rte": 60.0, "superglue/cb": 45.0}
    table = Evaluator.format_table(scores, step=7)
    assert table == (
        "evaluation at step 7\n"
        "task          metrics\n"
        "glue/rte      accuracy=60.00  score=60.00\n"
        "superglue/cb  macro_f1=40.00  score=45.00\n"
        "glue_average  60.00"
    )
    # A task name with a slash in the metric part and a long name widen the column.
    wide = Evaluator.format_table({"custom/a/b/accuracy": 1.0, "x": 2.0}, step=1).splitlines()
    assert wide[1:] == ["task          metrics", "custom/a/b    accuracy=1.00", "x             2.00"]


def test_window_stats_per_task_loss_without_distributed():
    stats = WindowStats(num_tasks=3)
    batch = {"task_ids": torch.tensor([0, 2, 2]), "attention_mask": torch.ones(3, 4),
             "labels": torch.tensor([[1, -100], [1, 1], [1, 1]])}
    out = SimpleNamespace(example_loss_sum=torch.tensor([1.0, 2.0, 4.0]),
                          example_token_count=torch.tensor([1.0, 2.0, 2.0]))
    stats.add_micro_batch(batch, out)
    totals = stats.reduce()
    assert totals["task_loss"].tolist() == [1.0, 0.0, 6.0]
    assert totals["task_tokens"].tolist() == [1.0, 0.0, 4.0]
    assert totals["tokens"].item() == 12 + 5 and totals["samples"].item() == 3


def test_a_tokenizer_larger_than_the_embedding_is_refused_early():
    with pytest.raises(ConfigError, match="vocab_size 64 is smaller than the tokenizer's 100 tokens"):
        check_vocabulary(FakeTokenizer(), SimpleNamespace(vocab_size=64), "configs/models/x")


def test_cli_rejects_a_typo_before_anything_starts(capsys):
    assert main(["validate", "--config", str(REPO / "configs" / "demo.yaml"), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key optim.lrr" in err and "lr" in err


def test_help_and_the_parse_every_rank_makes_import_neither_torch_nor_deepspeed_nor_transformers():
    """Seconds on a busy machine: ``--help`` answers at once, and a rank's parse adds nothing to
    what its command imports anyway."""
    probe = """
import contextlib, io, sys
from hp_deepspeed import cli
for argv in (["--help"], ["train", "--help"], ["validate", "--help"], ["report", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:
            pass
cli.parse_args(["train", "--config", "x.yaml", "--resume", "auto", "optim.lr=1e-4"])
print(sorted(m for m in ("torch", "deepspeed", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_train_with_a_bad_task_fails_fast_with_the_known_tasks_listed(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hp_deepspeed.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
         f"run.dir={tmp_path}", "data.tasks=[glue/rtee]"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unknown task 'glue/rtee'" in result.stderr and "glue/rte" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_resume_restores_the_data_stream_position(tmp_path):
    """Trainer.save hands the stream's position to the checkpoint and Trainer.resume gives it back:
    the resumed trainer's next batches are the ones the interrupted one would have drawn."""
    import json

    from hp_deepspeed.data import DataConfig, TrainStream, build_tasks, load_tokenizer
    from hp_deepspeed.training.trainer import Trainer

    cfg = DataConfig(tasks=["glue/rte", "superglue/cb"], cache_dir=str(tmp_path), bucket_pool_batches=2)
    tokenizer, tasks = load_tokenizer(None), build_tasks(cfg)

    def trainer(saved_state=None):
        t = object.__new__(Trainer)  # only the pieces resume/trainer_state use
        t.stream = TrainStream(cfg, tasks, tokenizer, micro_batch_size=2, seed=3)
        t.step, t.is_main, t.engine = 0, False, None
        t.resume_from = None if saved_state is None else "step-5"
        t.checkpoints = SimpleNamespace(load=lambda engine, point: saved_state)
        return t

    interrupted = trainer()
    for _ in range(5):
        next(interrupted.stream)
    interrupted.step = 5
    state = json.loads(json.dumps(interrupted.trainer_state()))  # as trainer_state.json holds it
    expected = [next(interrupted.stream) for _ in range(6)]  # crosses pool boundaries

    resumed = trainer(state)
    resumed.resume()
    assert resumed.step == 5 and resumed.resume_from is None
    for want in expected:
        got = next(resumed.stream)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # and a fresh stream differs from the resumed one, so the comparison above can fail
    fresh = trainer()
    assert not all(torch.equal(next(fresh.stream)["input_ids"], want["input_ids"]) for want in expected[:1])


class AccumulatingEngine:
    """What Trainer.train_step needs of a DeepSpeed engine, behaving like one on a single rank:
    ``backward`` scales the loss by 1/gradient_accumulation before autograd, as DeepSpeed does."""

    def __init__(self, model, accumulation):
        self.model, self.accumulation = model, accumulation

    def __call__(self, **batch):
        return self.model(**batch)

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def step(self):
        pass


def step_only_trainer(model, variant: str, accumulation: int):
    """A Trainer holding only what train_step reads, around ``model`` on one CPU rank."""
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.training.flops import shape_of
    from hp_deepspeed.training.trainer import Trainer
    from tests.conditioning.common import TINY_COND

    trainer = object.__new__(Trainer)
    trainer.cfg = SimpleNamespace(training=SimpleNamespace(gradient_accumulation=accumulation),
                                  conditioning=ConditioningConfig(variant=variant, **TINY_COND))
    trainer.device, trainer.world_size, trainer.model = torch.device("cpu"), 1, model
    trainer.model_shape = shape_of(model.config)
    trainer.engine = AccumulatingEngine(model, accumulation)
    return trainer


@pytest.mark.parametrize("variant, extra_encoder, kv_slots", [
    ("none", 0, 0), ("prompt_tuning", 3, 0), ("hyperprompt_global", 0, 3)])
def test_step_flops_count_the_prompt_tokens_each_variant_adds(variant, extra_encoder, kv_slots):
    """MFU's FLOP count: prompt_tuning's 3 soft tokens lengthen the encoder input; HyperPrompt's
    3 key/value slots lengthen what each self-attention attends to (TINY_COND: prompt_length 3)."""
    from hp_deepspeed.training.flops import shape_of, train_step_flops
    from tests.conditioning.common import random_batch, tiny_model

    model = tiny_model(variant)
    micro = [random_batch(3, seed=1, max_src=9, max_tgt=6), random_batch(2, seed=2, max_src=5, max_tgt=3)]
    trainer = step_only_trainer(model, variant, accumulation=2)
    window = WindowStats(num_tasks=4)
    trainer.train_step(iter(micro), window)
    shape = shape_of(model.config)
    expected = sum(train_step_flops(shape, b["input_ids"].shape[0], b["input_ids"].shape[1] + extra_encoder,
                                    b["labels"].shape[1], kv_slots) for b in micro)
    assert window.flops == pytest.approx(expected)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_global_batch():
    """Trainer.train_step with accumulation 2 (two micro-batches of different lengths and token
    counts) gives the gradient of the token-mean loss over both, as accumulation 1 over one
    micro-batch holding both examples' sets would: the ``x accumulation`` factor is exercised."""
    from tests.conditioning.common import random_batch, tiny_model

    model = tiny_model("hyperprompt_global")
    micro = [random_batch(3, seed=1, max_src=9, max_tgt=6), random_batch(3, seed=2, max_src=5, max_tgt=3)]

    trainer = step_only_trainer(model, "hyperprompt_global", accumulation=2)
    window = WindowStats(num_tasks=4)
    trainer.train_step(iter(micro), window)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    outs = [model(**b) for b in micro]
    tokens = sum(o.example_token_count.sum() for o in outs)
    (sum(o.example_loss_sum.sum() for o in outs) / tokens).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert window.samples == 6 and window.reduce()["task_tokens"].sum() == tokens


def test_a_packed_step_has_the_unpacked_gradient_and_per_task_losses():
    """train_step on packed rows (data.packing): the same gradient, per-task loss and token
    sums, example count and FLOP-relevant token count as on the same examples unpacked."""
    from tests.conditioning.common import pack, random_batch, tiny_model

    model = tiny_model("hyperprompt_global").float()
    batch = random_batch(10, seed=3)
    packed, _, _ = pack(batch)
    sums = []
    for micro in (batch, packed):
        model.zero_grad(set_to_none=True)
        window = WindowStats(num_tasks=4)
        step_only_trainer(model, "hyperprompt_global", accumulation=1).train_step(iter([micro]), window)
        sums.append((window.reduce(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (unpacked, grads), (packed_totals, packed_grads) = sums
    for key in ("task_loss", "task_tokens", "samples", "tokens"):
        torch.testing.assert_close(packed_totals[key], unpacked[key], rtol=1e-6, atol=1e-5, msg=key)
    assert unpacked["samples"].item() == len(batch["task_ids"])
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


class FakeTerminal(io.StringIO):
    """What a terminal receives: tqdm draws on it as on a tty."""

    def isatty(self):
        return True


def rendered_lines(written: str) -> list[str]:
    """The lines a person sees: a carriage return moves back to the start of the line, where the
    next characters overwrite what is there."""
    lines, line, column = [], [], 0
    for char in written:
        if char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        elif char == "\r":
            column = 0
        else:
            line[column:column + 1] = [char]
            column += 1
    if "".join(line).strip():
        lines.append("".join(line).rstrip())
    return lines


def test_log_lines_written_while_the_progress_bar_is_drawn_never_share_a_line_with_it(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "100")
    handler = logging.StreamHandler(sys.stderr)  # what logging.basicConfig gives the CLI
    handler.setFormatter(logging.Formatter("INFO %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with progress_bar(total=6, initial=0, shown=True) as bar:
            for step in range(1, 7):
                bar.update(1)
                bar.refresh()  # drawn before each line, as a slow step's bar is
                logging.getLogger("hp_deepspeed.training.trainer").info("step %d loss=1.0", step)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = rendered_lines(terminal.getvalue())
    logged = [line for line in lines if "loss=1.0" in line]
    assert [line for line in logged if not line.startswith("INFO step")] == [], lines
    assert logged == [f"INFO step {step} loss=1.0" for step in range(1, 7)], lines
    assert any(line.startswith("train: 100%") for line in lines), lines  # the bar was drawn


def test_a_progress_bar_that_is_not_shown_writes_nothing_and_leaves_logging_alone(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handlers = list(logging.getLogger().handlers)
    with progress_bar(total=3, initial=0, shown=False) as bar:
        bar.update(3)
        assert logging.getLogger().handlers == handlers
    assert terminal.getvalue() == ""
