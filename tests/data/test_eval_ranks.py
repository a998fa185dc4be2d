"""``Evaluator`` across ranks, simulated in one process: every rank is a thread running the real
Evaluator over its real shard of the eval sets, and ``collectives.all_gather_objects`` is a barrier among
the threads. The model is a fake whose scores depend only on each example's own tokens, so the
predictions do not depend on how examples are batched and W ranks must give exactly the 1-rank
scores: merging, dummy examples and ranks holding only dummies all show up in the numbers.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from hp_deepspeed.data import build_tasks
from hp_deepspeed.training import evaluation
from hp_deepspeed.training.evaluation import Evaluator
from hp_deepspeed.training.train_config import EvalConfig

# Bundled validation sets of 12 examples each, 3-way (cb) and 2-way (rte) label words, scored by
# rank classification; synthetic/first (100 examples) is decoded.
TASKS = ["glue/rte", "superglue/cb", "synthetic/first"]


class PerExampleScorer(torch.nn.Module):
    """Loss of label word ``w`` for an example: a hash of (its input tokens, w's first token)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the Evaluator reads the device from it

    def forward(self, input_ids, attention_mask, labels, task_ids):
        content = (input_ids * attention_mask).sum(dim=1)  # padding does not change it
        return SimpleNamespace(example_loss_sum=((content * 31 + labels[:, 0] * 17) % 101).float())

    max_new_tokens_seen: set = set()

    def generate(self, input_ids, attention_mask, task_ids, max_new_tokens):
        """Decoder start, then the example's input token k (k = 0 or 1, from its content), then EOS:
        right for synthetic/first (a one-word target) when k is 0, wrong otherwise."""
        self.max_new_tokens_seen.add(max_new_tokens)
        content = (input_ids * attention_mask).sum(dim=1)
        rows = [[0] + ids[int(c) % 2:int(c) % 2 + 1].tolist() + [1] for ids, c in zip(input_ids, content)]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])  # pad (0) is skipped in decoding


class ThreadRanks:
    """A stand-in for the collectives module where each thread is one rank of ``world_size``."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list = [None] * world_size
        self.local = threading.local()
        self.gathers = 0

    def all_gather_objects(self, obj) -> list:
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        gathered = list(self.slots)
        self.gathers += 1
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return gathered


def evaluate(make_cfg, tokenizer, monkeypatch, world_size: int, batch_size: int, max_examples: int = 0):
    """Every rank's scores from a real Evaluator on ``world_size`` simulated ranks."""
    cfg = make_cfg(tasks=TASKS)
    tasks = build_tasks(cfg)
    eval_cfg = EvalConfig(batch_size=batch_size, max_examples_per_task=max_examples)
    fake = ThreadRanks(world_size)
    monkeypatch.setattr(evaluation, "collectives", fake)
    results, errors = [None] * world_size, []
    evaluators = [Evaluator(eval_cfg, cfg, tasks, tokenizer, r, world_size) for r in range(world_size)]

    def rank(r: int) -> None:
        fake.local.rank = r
        try:
            results[r] = evaluators[r].evaluate(PerExampleScorer(), step=1)
        except BaseException as err:  # noqa: BLE001 - reported below, with the rank
            errors.append((r, err))
            fake.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0][1]
    return results, evaluators


@pytest.fixture(scope="module")
def one_rank_scores(tokenizer, session_cache):
    from hp_deepspeed.data import DataConfig

    cfg = DataConfig(tasks=TASKS, cache_dir=session_cache)
    tasks = build_tasks(cfg)
    return Evaluator(EvalConfig(batch_size=5), cfg, tasks, tokenizer, 0, 1).evaluate(PerExampleScorer(), step=1)


def test_one_rank_scores_are_not_trivial(one_rank_scores):
    # The fake model is right on some examples and wrong on others, so a lost or duplicated
    # example changes the scores below.
    for key in ("glue/rte/accuracy", "superglue/cb/accuracy", "synthetic/first/accuracy"):
        assert 0 < one_rank_scores[key] < 100, key
    assert PerExampleScorer.max_new_tokens_seen == {EvalConfig().max_new_tokens}
    # The GLUE average over the GLUE sets present (here only RTE): partial benchmarks are averaged.
    assert one_rank_scores["glue_average"] == one_rank_scores["glue/rte/score"]


# (world size, batch size): dummies on some ranks; 16 ranks of 1 over 12 examples: ranks 12-15
# hold only dummies; 3 ranks of 4 = one global batch of exactly 12, no dummies.
@pytest.mark.parametrize("world_size, batch_size", [(2, 5), (16, 1), (3, 4)])
def test_w_ranks_give_the_one_rank_scores_on_every_rank(make_cfg, tokenizer, monkeypatch, one_rank_scores,
                                                        world_size, batch_size):
    results, evaluators = evaluate(make_cfg, tokenizer, monkeypatch, world_size, batch_size)
    for r, scores in enumerate(results):
        assert scores == one_rank_scores, f"rank {r}"
    if world_size == 16:
        for k in (0, 1):  # rte and cb, 12 examples each: ranks 12-15 hold only dummies of them
            only_dummies = [r for r, e in enumerate(evaluators)
                            if all((b["example_index"] < 0).all() for b in e.eval_sets[k].batches)]
            assert only_dummies == [12, 13, 14, 15]


def test_max_examples_per_task_scores_the_same_subset_on_every_rank(make_cfg, tokenizer, monkeypatch):
    # 2 ranks x batch 2 with max 4 examples: one global batch, i.e. the 4 longest examples of each
    # set, merged from both ranks (rank 0 alone holds only 2 of them).
    results, evaluators = evaluate(make_cfg, tokenizer, monkeypatch, 2, 2, max_examples=4)
    assert results[0] == results[1]
    for eval_set in evaluators[0].eval_sets:
        (batch,) = eval_set.batches
        assert (batch["example_index"] >= 0).all()
    one, _ = evaluate(make_cfg, tokenizer, monkeypatch, 1, 4, max_examples=4)
    assert results[0] == one[0]
    # 5 examples with global batches of 4: rounded up to 2 batches, on every rank.
    _, evaluators = evaluate(make_cfg, tokenizer, monkeypatch, 2, 2, max_examples=5)
    assert all(len(s.batches) == 2 for e in evaluators for s in e.eval_sets)
