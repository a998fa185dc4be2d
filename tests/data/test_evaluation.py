"""Evaluation sharding keeps ranks in lockstep and loses no example."""

from __future__ import annotations

import pytest

from hp_deepspeed.data import build_eval_batches, build_tasks


@pytest.mark.parametrize("world_size,micro_batch_size", [(1, 4), (3, 2), (4, 5)])
def test_every_rank_same_batches_and_every_example_once(make_cfg, tokenizer, world_size, micro_batch_size):
    cfg = make_cfg(tasks=["glue/mnli", "synthetic/first"])
    tasks = build_tasks(cfg)
    per_rank = [build_eval_batches(cfg, tasks, tokenizer, micro_batch_size, r, world_size) for r in range(world_size)]
    for sets in zip(*per_rank):
        assert len({len(s.batches) for s in sets}) == 1
        assert all(b["input_ids"].shape[0] == micro_batch_size for s in sets for b in s.batches)
        indices = [int(i) for s in sets for b in s.batches for i in b["example_index"]]
        real = sorted(i for i in indices if i >= 0)
        assert real == list(range(len(sets[0])))
        assert len(indices) - len(real) < micro_batch_size * world_size  # dummies only pad the last step
    names = [s.name for s in per_rank[0]]
    assert names == ["glue/mnli_matched", "glue/mnli_mismatched", "synthetic/first"]


def test_metrics_from_gathered_outputs(make_cfg, tokenizer):
    cfg = make_cfg(tasks=["superglue/cb"])
    tasks = build_tasks(cfg)
    outputs = {}
    for rank in range(2):
        (eval_set,) = build_eval_batches(cfg, tasks, tokenizer, 4, rank, 2)
        for batch in eval_set.batches:
            for index, labels in zip(batch["example_index"].tolist(), batch["labels"]):
                if index >= 0:  # dummies are dropped; the "model" echoes the target
                    outputs[index] = tokenizer.decode(labels[labels != -100], skip_special_tokens=True)
                    assert batch["task_ids"][0] == tasks[0].task_id
    assert eval_set.compute_metrics(outputs) == {"macro_f1": 100.0, "accuracy": 100.0, "score": 100.0}
    with pytest.raises(ValueError, match="first missing: \\[0\\]"):
        eval_set.compute_metrics({i: "neutral" for i in range(1, len(eval_set))})
