"""``CheckpointManager`` in one process, fast: torch.distributed replaced by a one-rank stand-in
and the DeepSpeed engine by a small fake that saves its module and client state like
``engine.save_checkpoint`` does. What the slow 2-rank tests (test_resume.py) prove on a real
ZeRO-3 engine, these prove in a second, so that a breakage of the manager's own logic (the RNG
restore, the step check, retention, the resume choice) fails a unit test too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hp_deepspeed.checkpointing import CheckpointConfig, CheckpointError, CheckpointManager
from hp_deepspeed.checkpointing import manager as manager_module
from hp_deepspeed.checkpointing.layout import MARKER, complete_checkpoints, read_latest

MODEL_CONFIG = {"hidden": 3}


class OneRank:
    """torch.distributed for a single rank: collectives are identities."""

    ReduceOp = SimpleNamespace(MIN="min")

    @staticmethod
    def get_rank():
        return 0

    @staticmethod
    def get_world_size():
        return 1

    @staticmethod
    def barrier():
        pass

    @staticmethod
    def all_reduce(tensor, op=None):
        pass

    @staticmethod
    def broadcast_object_list(objects, src=0):
        pass


class FakeEngine:
    """The slice of a DeepSpeed engine the manager uses; ``save_checkpoint`` writes the module
    and the client state under ``root/tag`` as DeepSpeed does."""

    def __init__(self, hidden: int = 3, init: float = 0.0):
        self.module = torch.nn.Linear(2, hidden)
        torch.nn.init.constant_(self.module.weight, init)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        self.load_calls = []
        self.save_latest_args = []

    def zero_optimization_stage(self):
        return 0

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return False

    def save_checkpoint(self, root, tag, client_state, save_latest):
        self.save_latest_args.append(save_latest)
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "client": client_state},
                   folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        self.load_calls.append((root, tag, self._config.load_universal_checkpoint))
        path = Path(root) / tag / "mp_rank_00_model_states.pt"
        saved = torch.load(path, weights_only=False)
        self.module.load_state_dict(saved["module"])
        return str(path), saved["client"]


@pytest.fixture(autouse=True)
def one_rank(monkeypatch):
    monkeypatch.setattr(manager_module, "dist", OneRank)


def manager(run_dir, **config) -> CheckpointManager:
    config.setdefault("interval", 2)
    config.setdefault("keep_last", 2)
    return CheckpointManager(CheckpointConfig(**config), run_dir, model_config=MODEL_CONFIG)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_load_restores_the_rng_weights_and_trainer_state(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    engine = FakeEngine(init=0.5)
    manager(tmp_path).save(engine, 2, {"data": {"position": 17}}, job_config={"toy": True})
    after_save = draws()

    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # a fresh process's other seeds
    fresh = FakeEngine(init=-1.0)
    mgr = manager(tmp_path)
    point = mgr.find_resume_point()
    state = mgr.load(fresh, point)
    assert draws() == after_save  # python, numpy and torch generators all restored
    assert state == {"data": {"position": 17}, "step": 2}
    assert torch.equal(fresh.module.weight, torch.full((3, 2), 0.5))
    assert fresh.load_calls == [(str(tmp_path / "checkpoints"), "step-2", False)]


def test_the_checkpoint_records_its_identity_and_config(tmp_path):
    step_dir = manager(tmp_path).save(FakeEngine(), 4, {"k": 1}, job_config={"toy": True})
    assert step_dir == tmp_path / "checkpoints" / "step-4"
    marker = json.loads((step_dir / MARKER).read_text())
    assert {k: marker[k] for k in ("step", "world_size", "zero_stage", "precision", "param_count", "model_config")} \
        == {"step": 4, "world_size": 1, "zero_stage": 0, "precision": "fp32", "param_count": 9,
            "model_config": MODEL_CONFIG}
    assert (step_dir / "config.yaml").read_text() == "toy: true\n"
    assert json.loads((step_dir / "params.json").read_text()) == {"weight": [3, 2], "bias": [3]}
    assert json.loads((step_dir / "trainer_state.json").read_text()) == {"k": 1, "step": 4}
    assert (step_dir / "rng" / "rank-0.pt").is_file()
    assert read_latest(tmp_path / "checkpoints") == "step-4"
    assert not list((tmp_path / "checkpoints").glob("*.staging"))


def test_a_trainer_state_with_another_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="trainer_state\\['step'\\] is 3 but saving step 4"):
        manager(tmp_path).save(FakeEngine(), 4, {"step": 3})


def test_deepspeed_state_of_another_step_is_refused(tmp_path):
    engine = FakeEngine()
    mgr = manager(tmp_path)
    mgr.save(engine, 2)
    # The shards claim another step than the marker: a mixed-up folder must not load silently.
    engine.save_checkpoint(tmp_path / "checkpoints", "step-2", {manager_module.CLIENT_STEP_KEY: 7}, False)
    with pytest.raises(CheckpointError, match="DeepSpeed state is from step 7, marker says 2"):
        mgr = manager(tmp_path)
        mgr.load(FakeEngine(), mgr.find_resume_point())


def test_due_every_interval_steps(tmp_path):
    mgr = manager(tmp_path, interval=3)
    assert [s for s in range(0, 10) if mgr.due(s)] == [3, 6, 9]


def test_retention_keeps_the_last_k_and_the_best_per_task(tmp_path):
    mgr = manager(tmp_path, keep_last=2)
    engine = FakeEngine()
    for step, scores in ((2, {"a": 0.9}), (4, {"a": 0.5, "b": 0.5}), (6, {"b": 0.7}), (8, {"a": 0.1})):
        improved = mgr.record_eval(step, scores)
        mgr.save(engine, step)
        if step == 4:
            assert improved == ["b"]
    assert [c.step for c in complete_checkpoints(tmp_path / "checkpoints")] == [2, 6, 8]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text()) == \
        {"a": {"step": 2, "score": 0.9}, "b": {"step": 6, "score": 0.7}}
    assert manager(tmp_path).best == mgr.best  # read back by the next process
    unpinned = manager(tmp_path / "other", keep_last=1, keep_best=False)
    for step in (2, 4):
        unpinned.record_eval(step, {"a": 1.0 * step})
        unpinned.save(engine, step)
    assert [c.step for c in complete_checkpoints(tmp_path / "other" / "checkpoints")] == [4]


def test_a_second_save_of_the_same_step_is_skipped(tmp_path):
    mgr, engine = manager(tmp_path), FakeEngine()
    marker = mgr.save(engine, 2) / MARKER
    before = marker.stat().st_mtime_ns
    mgr.save(engine, 2)
    assert marker.stat().st_mtime_ns == before


def test_resume_choices(tmp_path):
    assert manager(tmp_path).find_resume_point() is None  # auto, nothing saved: fresh start
    mgr, engine = manager(tmp_path, keep_last=3), FakeEngine()
    mgr.save(engine, 2)
    mgr.save(engine, 4)
    assert manager(tmp_path).find_resume_point().step == 4
    assert manager(tmp_path, resume="none").find_resume_point() is None
    explicit = manager(tmp_path).find_resume_point(str(tmp_path / "checkpoints" / "step-2"))
    assert (explicit.step, explicit.world_size) == (2, 1)
    with pytest.raises(CheckpointError, match="does not exist"):
        manager(tmp_path).find_resume_point(str(tmp_path / "nowhere"))
    (tmp_path / "checkpoints" / "step-9").mkdir()
    with pytest.raises(CheckpointError, match="step-9: no COMPLETE marker"):
        manager(tmp_path).find_resume_point(str(tmp_path / "checkpoints" / "step-9"))
    (tmp_path / "checkpoints" / "misc").mkdir()
    with pytest.raises(CheckpointError, match="is not a step-N checkpoint folder"):
        manager(tmp_path).find_resume_point(str(tmp_path / "checkpoints" / "misc"))


def test_a_different_model_is_refused_before_and_at_load(tmp_path):
    manager(tmp_path).save(FakeEngine(), 2)
    other = CheckpointManager(CheckpointConfig(), tmp_path, model_config={"hidden": 4})
    with pytest.raises(CheckpointError, match="model config hidden: checkpoint has 3, this job has 4"):
        other.find_resume_point()
    mgr = manager(tmp_path)
    point = mgr.find_resume_point()
    with pytest.raises(CheckpointError, match="parameter weight: checkpoint shape \\[3, 2\\], model shape \\[4, 2\\]"):
        mgr.load(FakeEngine(hidden=4), point)


def test_another_world_size_is_refused_when_conversion_is_off(tmp_path):
    manager(tmp_path).save(FakeEngine(), 2)
    marker_path = tmp_path / "checkpoints" / "step-2" / MARKER
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "world_size": 2}))
    with pytest.raises(CheckpointError, match="saved on 2 ranks, this job has 1.*convert-universal"):
        manager(tmp_path, convert_universal="never").find_resume_point()
    point = manager(tmp_path).find_resume_point()
    assert manager(tmp_path).needs_universal(point)


def test_a_preemption_signal_during_a_save_lets_the_save_finish_and_stops_at_the_next_step(tmp_path):
    """SIGTERM arriving while the shards are being written: the handler only records it, so the
    checkpoint is committed whole, and the next step boundary decides to stop (and save again)."""
    import os
    import signal

    from hp_deepspeed.training.preemption import PreemptionHandler

    class SignalledMidSave(FakeEngine):
        def save_checkpoint(self, root, tag, client_state, save_latest):
            os.kill(os.getpid(), signal.SIGTERM)  # would kill pytest without the handler
            super().save_checkpoint(root, tag, client_state, save_latest)

    mgr, engine = manager(tmp_path), SignalledMidSave()
    with PreemptionHandler() as handler:
        assert not handler.should_stop(2)
        step_dir = mgr.save(engine, 2)  # the interval save during which the signal arrives
        assert handler.received == signal.SIGTERM
        assert (step_dir / MARKER).is_file() and read_latest(tmp_path / "checkpoints") == "step-2"
        assert not list((tmp_path / "checkpoints").glob("*.staging"))
        assert handler.should_stop(3)  # the trainer then saves step 3 and exits 75
        mgr.save(FakeEngine(), 3)
    assert manager(tmp_path).find_resume_point().step == 3


def test_save_logs_and_deepspeeds_own_latest_file_is_not_written(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger=manager_module.__name__)
    (tmp_path / "checkpoints" / "step-6.staging").mkdir(parents=True)  # debris of a crashed save
    mgr, engine = manager(tmp_path), FakeEngine()
    step_dir = mgr.save(engine, 2, job_config={"b": 1, "a": 2})
    mgr.save(engine, 2)
    assert engine.save_latest_args == [False]  # our `latest` pointer is the only one
    assert not (tmp_path / "checkpoints" / "step-6.staging").exists()
    assert (step_dir / "config.yaml").read_text() == "b: 1\na: 2\n"  # the job's key order
    messages = [r.getMessage() for r in caplog.records]
    assert f"removed leftover of an interrupted save or deletion: {tmp_path / 'checkpoints' / 'step-6.staging'}" in messages
    assert any(m.startswith(f"saved checkpoint {step_dir} in ") and m.endswith("s") for m in messages)
    assert f"checkpoint {step_dir} already holds this exact state; not re-saving" in messages
    mgr = manager(tmp_path)
    mgr.load(FakeEngine(), mgr.find_resume_point())
    assert f"resumed from {step_dir.resolve()} (step 2)" in [r.getMessage() for r in caplog.records]
    text = "toy: yes\n"
    assert manager(tmp_path).save(engine, 4, job_config=text).joinpath("config.yaml").read_text() == text


def test_a_failed_write_abandons_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    class DiskFull(FakeEngine):
        def save_checkpoint(self, root, tag, client_state, save_latest):
            raise OSError("No space left on device")

    manager(tmp_path).save(FakeEngine(), 2)
    with pytest.raises(CheckpointError, match="step-4.staging: rank 0 failed to write its part: No space left"):
        manager(tmp_path).save(DiskFull(), 4)
    assert not (tmp_path / "checkpoints" / "step-4").exists()
    assert read_latest(tmp_path / "checkpoints") == "step-2"
    assert manager(tmp_path).find_resume_point().step == 2


def test_a_failed_commit_is_reported(tmp_path, monkeypatch):
    def broken(step_dir, marker):
        raise OSError("read-only file system")

    monkeypatch.setattr(manager_module, "write_marker", broken)
    with pytest.raises(CheckpointError, match="step-2: rank 0 could not commit the checkpoint: OSError: read-only"):
        manager(tmp_path).save(FakeEngine(), 2)
    assert read_latest(tmp_path / "checkpoints") is None
