"""The committed bundled data is what scripts/make_bundled_data.py makes, and fits its purpose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hp_deepspeed.data import BUNDLED_DATA_DIR, REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import make_bundled_data  # noqa: E402  (a script, not a package module)


def test_script_reproduces_the_committed_files(tmp_path):
    make_bundled_data.main(["--out", str(tmp_path)])
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    committed = sorted(p.relative_to(BUNDLED_DATA_DIR) for p in BUNDLED_DATA_DIR.rglob("*.jsonl"))
    assert made == committed
    assert all((tmp_path / p).read_bytes() == (BUNDLED_DATA_DIR / p).read_bytes() for p in made)
    assert {str(p.parent) for p in made} == set(REGISTRY)


def test_synthetic_tasks_share_inputs_and_differ_in_targets():
    def rows(op, split):
        return [json.loads(line) for line in (BUNDLED_DATA_DIR / "synthetic" / op / f"{split}.jsonl").open()]

    ops = ["copy", "reverse", "sort", "first", "last"]
    for split in ("train", "validation"):
        tables = [rows(op, split) for op in ops]
        inputs = [[r["inputs"] for r in t] for t in tables]
        assert all(i == inputs[0] for i in inputs) and len(set(inputs[0])) == len(inputs[0])
        # for most inputs the five tasks want at least four different outputs
        distinct = [len({t[i]["targets"] for t in tables}) for i in range(len(inputs[0]))]
        assert sum(d >= 4 for d in distinct) / len(distinct) > 0.8
    train = {r["inputs"] for r in rows("copy", "train")}
    assert not train & {r["inputs"] for r in rows("copy", "validation")}
