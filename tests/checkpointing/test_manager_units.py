"""``CheckpointManager`` in one process, fast: torch.distributed replaced by a one-rank stand-in
and the DeepSpeed engine by a small fake that saves its module and client state like
``engine.save_checkpoint`` does. What the slow 2-rank tests (test_resume.py) prove on a real
ZeRO-3 engine, these prove in a second, so that a breakage of the manager's own logic (the RNG
restore, the step check, retention, the resume choice) fails a unit test too.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hp_deepspeed.checkpointing import CheckpointConfig, CheckpointError, CheckpointManager
from hp_deepspeed.checkpointing import manager as manager_module
from hp_deepspeed.checkpointing.integrity import RankReport, WriteFailure
from hp_deepspeed.checkpointing import integrity
from hp_deepspeed.checkpointing.layout import MARKER, CheckpointInfo, complete_checkpoints, read_latest
from hp_deepspeed.launching import collectives

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


class TorchCheckpointEngine:
    """DeepSpeed's default checkpoint engine: every file of a save goes through ``save``."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class FakeEngine:
    """The slice of a DeepSpeed engine the manager uses; ``save_checkpoint`` writes the module,
    optimizer, LR scheduler and client state under ``root/tag`` as DeepSpeed does, through its
    ``checkpoint_engine`` (ZeRO-3 names its files after the rank:
    ``zero_pp_rank_R_mp_rank_00_model_states.pt`` and ``*_optim_states.pt``).

    The optimizer has the trainer's two param groups: weights with weight decay, the bias without.
    ``load_checkpoint`` with ``load_universal_checkpoint`` set reproduces the two defects of
    DeepSpeed's universal ZeRO-3 loader that ``_repair_universal_load`` undoes: group 0's
    hyperparameters in every group, and one ``step`` tensor shared by every state."""

    def __init__(self, hidden: int = 3, init: float = 0.0, precision: str = "fp32", stage: int = 0, rank: int = 0):
        self.module = torch.nn.Linear(2, hidden)
        torch.nn.init.constant_(self.module.weight, init)
        self.optimizer = torch.optim.AdamW(
            [{"params": [self.module.weight], "weight_decay": 0.01},
             {"params": [self.module.bias], "weight_decay": 0.0}], lr=0.1, betas=(0.8, 0.9))
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        self.checkpoint_engine = TorchCheckpointEngine()
        self.precision, self.stage, self.rank = precision, stage, rank
        self.load_calls = []
        self.save_latest_args = []

    def zero_optimization_stage(self):
        return self.stage

    def bfloat16_enabled(self):
        return self.precision == "bf16"

    def fp16_enabled(self):
        return self.precision == "fp16"

    def train_step(self):
        self.optimizer.zero_grad()
        self.module(torch.ones(4, 2)).pow(2).sum().backward()
        self.optimizer.step()
        self.lr_scheduler.step()

    def _files(self, folder: Path) -> tuple[Path, Path]:
        if self.stage == 3:
            return (folder / f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt",
                    folder / f"bf16_zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        return folder / "mp_rank_00_model_states.pt", folder / "mp_rank_00_optim_states.pt"

    def save_checkpoint(self, root, tag, client_state, save_latest):
        self.save_latest_args.append(save_latest)
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        model_file, optim_file = self._files(folder)
        self.checkpoint_engine.save({"module": self.module.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                                     "client": client_state}, str(model_file))
        self.checkpoint_engine.save(self.optimizer.state_dict(), str(optim_file))

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        self.load_calls.append((root, tag, self._config.load_universal_checkpoint))
        model_file, optim_file = self._files(Path(root) / tag)
        saved = torch.load(model_file, weights_only=False)
        self.module.load_state_dict(saved["module"])
        if load_optimizer_states:
            self.optimizer.load_state_dict(torch.load(optim_file, weights_only=False))
        if load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if self._config.load_universal_checkpoint:
            first, *others = self.optimizer.param_groups
            for group in others:
                group.update({k: v for k, v in first.items() if k != "params"})
            states = list(self.optimizer.state.values())
            shared = states[0]["step"] if states else None
            for state in states:
                state["step"] = shared
        return str(model_file), saved["client"]


@pytest.fixture(autouse=True)
def one_rank(monkeypatch):
    monkeypatch.setattr(manager_module, "dist", OneRank)


class FullDisk:
    """``os`` as ``checkpointing.integrity`` sees it on a full disk: the write of a file's bytes
    fails with ENOSPC (opening it and everything else works)."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk(monkeypatch) -> None:
    monkeypatch.setattr(integrity, "os", FullDisk())


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
    step_dir = mgr.save(engine, 2)
    # The shards claim another step than the marker: a mixed-up folder must not load silently,
    # also one saved before checkpoints had a manifest to catch the rewrite.
    engine.save_checkpoint(tmp_path / "checkpoints", "step-2", {manager_module.CLIENT_STEP_KEY: 7}, False)
    marker = json.loads((step_dir / MARKER).read_text())
    (step_dir / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "manifest"}))
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
    caplog.set_level(logging.DEBUG, logger=manager_module.__name__)
    mgr.load(FakeEngine(), mgr.find_resume_point())
    assert f"loaded {step_dir.resolve()} (step 2)" in [r.getMessage() for r in caplog.records]
    text = "toy: yes\n"
    assert manager(tmp_path).save(engine, 4, job_config=text).joinpath("config.yaml").read_text() == text


def test_a_failed_write_abandons_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager(tmp_path).save(FakeEngine(), 2)
    full_disk(monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        manager(tmp_path).save(FakeEngine(), 4)
    staging = tmp_path / "checkpoints" / "step-4.staging"
    assert str(caught.value) == (  # the disk in words, with the path; both shards hit the same cause
        "checkpoint step-4 not saved (step-2 stays the checkpoint to resume from):\n"
        f"  - rank 0 could not write {staging}/mp_rank_00_model_states.pt (and 1 more files): no space left on device")
    assert not staging.exists()  # the partial folder does not keep the disk full
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


# ---------------------------------------------------------------- several ranks, seen from one


class Group:
    """torch.distributed and ``launching.collectives`` for one rank of a ``world_size``-rank job.

    The other ranks are scripted: ``peer_ok`` says whether the peer's report at the save's
    agreement point (the gather of every rank's ``RankReport``) lists a failed write,
    ``on_reduce`` runs just before it (what the peers wrote by then), ``peer_problem`` is what the
    peer found verifying its share of a checkpoint at resume, and ``others_send`` lists the
    objects the other rank passes to successive broadcasts (rank 0's decisions when this rank is
    not rank 0; by default None, what a non-root rank passes). ``received`` records what each
    broadcast delivered: what every rank of the job ends up holding.
    """

    def __init__(self, rank: int, world_size: int = 2, peer_ok: bool = True, on_reduce=None, others_send=(),
                 peer_problem=None):
        self.rank, self.world_size = rank, world_size
        self.peer_ok, self.on_reduce, self.peer_problem = peer_ok, on_reduce, peer_problem
        self.others_send = list(others_send)
        self.barriers, self.reduced, self.received = 0, [], []

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world_size

    def barrier(self):
        self.barriers += 1

    def all_reduce_flag(self, value, op):
        if self.on_reduce is not None:
            self.on_reduce()
        self.reduced.append(int(value))
        return {"min": min, "max": max, "sum": sum}[op]([int(value), int(self.peer_ok)])

    def all_gather_objects(self, obj):
        other = 1 if self.rank == 0 else 0
        if isinstance(obj, RankReport):
            if self.on_reduce is not None:
                self.on_reduce()
            self.reduced.append(int(not obj.failures))
            peer = RankReport(other, failures=[] if self.peer_ok else [
                WriteFailure(other, f"/shared/zero_pp_rank_{other}_mp_rank_00_optim_states.pt", "no space left on device")])
        else:
            peer = self.peer_problem
        return [obj, peer] if self.rank == 0 else [peer, obj]

    def broadcast_object(self, obj, src=0):
        other = 1 if self.rank == 0 else 0
        sent = {self.rank: obj, other: self.others_send.pop(0) if self.others_send else None}
        self.received.append(sent[src])
        return sent[src]


def as_rank(monkeypatch, group: Group) -> Group:
    monkeypatch.setattr(manager_module, "dist", group)
    monkeypatch.setattr(manager_module, "collectives", group)
    return group


def peer_writes(root: Path, step: int, rank: int = 1, stage: int = 0):
    """What rank ``rank`` has written into ``step-N.staging`` by the time it reports success."""
    def write():
        staging = root / f"step-{step}.staging"
        torch.save({}, (staging / "rng").joinpath(f"rank-{rank}.pt"))
        if stage == 3:
            FakeEngine(stage=3, rank=rank).save_checkpoint(root, staging.name, {manager_module.CLIENT_STEP_KEY: step}, False)
    return write


def test_rank_0_commits_once_every_rank_saved_and_tells_the_others(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    group = as_rank(monkeypatch, Group(rank=0, on_reduce=peer_writes(root, 2, stage=3)))
    step_dir = manager(tmp_path).save(FakeEngine(stage=3), 2)
    assert step_dir == root / "step-2" and read_latest(root) == "step-2"
    assert json.loads((step_dir / MARKER).read_text())["world_size"] == 2
    assert sorted(p.name for p in step_dir.glob("*zero_pp_rank_*")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert group.reduced == [1]  # this rank vouched for its own files
    assert group.received == [None]  # every rank learns the commit succeeded


def test_a_peers_failed_write_abandons_the_save_on_every_rank(tmp_path, monkeypatch):
    """The peer caught its own write error and reports 0: rank 0 must not commit the half-written
    folder even though its own part is fine, and the previous checkpoint stays the one to resume."""
    manager(tmp_path).save(FakeEngine(), 2)
    root = tmp_path / "checkpoints"
    as_rank(monkeypatch, Group(rank=0, peer_ok=False, on_reduce=peer_writes(root, 4)))
    with pytest.raises(CheckpointError) as caught:
        manager(tmp_path).save(FakeEngine(), 4)
    assert str(caught.value) == (
        "checkpoint step-4 not saved (step-2 stays the checkpoint to resume from):\n"
        "  - rank 1 could not write /shared/zero_pp_rank_1_mp_rank_00_optim_states.pt: no space left on device")
    assert not (root / "step-4").exists() and read_latest(root) == "step-2"
    assert not (root / "step-4.staging").exists()
    assert [c.step for c in complete_checkpoints(root)] == [2]


def test_a_rank_that_failed_reports_it_to_the_others(tmp_path, monkeypatch):
    """The failing rank does not raise inside DeepSpeed's save (whose barrier the others wait
    in): it reaches the agreement point with its failure, and every rank raises the same line."""
    group = as_rank(monkeypatch, Group(rank=1))
    full_disk(monkeypatch)
    with pytest.raises(CheckpointError, match="rank 1 could not write .*/step-2.staging/mp_rank_00_model_states.pt "
                                              r"\(and 1 more files\): no space left on device$"):
        manager(tmp_path).save(FakeEngine(rank=1), 2)
    assert group.reduced == [0]  # rank 0 sees the failure in the gathered reports and abandons too


def test_files_missing_after_every_rank_reported_success_are_not_committed(tmp_path, monkeypatch):
    """A rank that wrote to a node-local disk reports success, yet rank 0 cannot see its files."""
    manager(tmp_path).save(FakeEngine(), 2)
    root = tmp_path / "checkpoints"
    group = as_rank(monkeypatch, Group(rank=0))
    with pytest.raises(CheckpointError) as caught:
        manager(tmp_path).save(FakeEngine(stage=3), 4)
    assert str(caught.value) == (
        f"{root / 'step-4'}: rank 0 could not commit the checkpoint: CheckpointError: {root / 'step-4.staging'}: "
        "files missing after every rank reported success: "
        "['rng/rank-1.pt', 'zero_pp_rank_1_*_model_states.pt', 'zero_pp_rank_1_*_optim_states.pt']")
    assert group.received == [str(caught.value).split("checkpoint: ", 1)[1]]  # the peers raise too
    assert read_latest(root) == "step-2" and [c.step for c in complete_checkpoints(root)] == [2]
    # Only the optimizer shards missing: named alone.
    def model_only():
        peer_writes(root, 6, stage=3)()
        for path in (root / "step-6.staging").glob("*zero_pp_rank_1_*optim_states.pt"):
            path.unlink()
    as_rank(monkeypatch, Group(rank=0, on_reduce=model_only))
    with pytest.raises(CheckpointError, match=r"success: \['zero_pp_rank_1_\*_optim_states.pt'\]$"):
        manager(tmp_path).save(FakeEngine(stage=3), 6)


def test_other_ranks_follow_rank_0s_verdict_and_leave_the_shared_files_to_it(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    (root / "step-6.staging").mkdir(parents=True)  # a save in flight is not rank 1's to clean up
    group = as_rank(monkeypatch, Group(rank=1, others_send=["OSError: read-only file system"]))
    mgr = manager(tmp_path)
    with pytest.raises(CheckpointError, match="step-2: rank 0 could not commit the checkpoint: OSError: read-only"):
        mgr.save(FakeEngine(rank=1), 2, {"k": 1}, job_config={"a": 1})
    assert (root / "step-6.staging").is_dir()
    staging = root / "step-2.staging"
    assert (staging / "rng" / "rank-1.pt").is_file()  # its own part
    assert sorted(p.name for p in staging.iterdir()) == ["mp_rank_00_model_states.pt", "mp_rank_00_optim_states.pt", "rng"]
    assert group.reduced == [1]

    group = as_rank(monkeypatch, Group(rank=1, others_send=[None]))  # rank 0 committed
    assert manager(tmp_path).save(FakeEngine(rank=1), 4) == root / "step-4"
    assert group.received == [None]


def record_fsyncs(monkeypatch) -> list[str]:
    """Every ``os.fsync`` of this process from now on, as the path its descriptor has open."""
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_every_rank_fsyncs_its_own_shards_before_vouching_for_them(tmp_path, monkeypatch):
    synced, reduced_after = record_fsyncs(monkeypatch), []
    group = as_rank(monkeypatch, Group(rank=1, others_send=[None],
                                       on_reduce=lambda: reduced_after.append([Path(p).name for p in synced])))
    manager(tmp_path).save(FakeEngine(stage=3, rank=1), 2)
    assert {"bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank-1.pt",
            "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(reduced_after[0])
    assert group.reduced == [1]


@pytest.mark.parametrize("stage", [0, 3])
def test_every_file_and_folder_of_a_checkpoint_is_fsynced_before_complete_and_latest(tmp_path, monkeypatch, stage):
    synced = record_fsyncs(monkeypatch)
    step_dir = manager(tmp_path).save(FakeEngine(stage=stage), 2, {"k": 1}, job_config={"a": 1})
    before_marker = synced[:next(i for i, p in enumerate(synced) if Path(p).name.startswith(".COMPLETE."))]
    # A file written atomically is fsynced under its temporary name (.NAME.random.tmp).
    staged = {re.sub(r"/\.([^/]+)\.[^./]+\.tmp$", r"/\1", p.replace(".staging", "")) for p in before_marker}
    written = {str(p) for p in step_dir.rglob("*") if p.name != MARKER} | {str(step_dir)}
    assert written - staged == set()
    assert str(step_dir / "mp_rank_00_model_states.pt") in staged or stage == 3
    assert any(Path(p).name.startswith(".latest.") for p in synced[len(before_marker):])


def test_rank_1_resumes_from_rank_0s_choice(tmp_path, monkeypatch):
    """Only rank 0 reads the checkpoint folder; the others take its choice, or its refusal."""
    point = manager_module.ResumePoint(str(tmp_path / "elsewhere" / "step-4"), 4, 2, {"step": 4})
    listing = ("ok", [CheckpointInfo(tmp_path / "elsewhere" / "step-4", 4, {"step": 4})])
    as_rank(monkeypatch, Group(rank=1, others_send=[listing, ("ok", point)]))
    assert manager(tmp_path).find_resume_point() == point
    as_rank(monkeypatch, Group(rank=1, others_send=[("error", "resume path step-4 does not exist")]))
    with pytest.raises(CheckpointError, match="^resume path step-4 does not exist$"):
        manager(tmp_path).find_resume_point()
    as_rank(monkeypatch, Group(rank=1, others_send=[listing, ("error", "checkpoint step-4 does not match this job")]))
    with pytest.raises(CheckpointError, match="^checkpoint step-4 does not match this job$"):
        manager(tmp_path).find_resume_point()
    as_rank(monkeypatch, Group(rank=1, others_send=[["precision: checkpoint has 'bf16', this job has 'fp32'"]]))
    with pytest.raises(CheckpointError, match="step-4 does not match this job:\n  - precision: checkpoint has 'bf16'"):
        manager(tmp_path).load(FakeEngine(rank=1), point)


def test_rank_0_shares_its_resume_choice_and_its_refusals(tmp_path, monkeypatch):
    manager(tmp_path).save(FakeEngine(), 2)
    group = as_rank(monkeypatch, Group(rank=0))
    point = manager(tmp_path).find_resume_point()
    (listed,) = group.received[0][1]
    assert point.step == 2 and group.received == [("ok", [listed]), ("ok", point)] and listed.step == 2
    group = as_rank(monkeypatch, Group(rank=0))
    with pytest.raises(CheckpointError, match="does not exist"):
        manager(tmp_path).find_resume_point(str(tmp_path / "nowhere"))
    assert group.received[0][0] == "error"


def test_a_rank_the_checkpoint_did_not_have_keeps_its_seeded_generators(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger=manager_module.__name__)
    manager(tmp_path).save(FakeEngine(init=0.5), 2)  # one rank
    point = manager(tmp_path).find_resume_point()
    as_rank(monkeypatch, Group(rank=1, others_send=[None]))  # rank 0 found no problem
    monkeypatch.setattr(manager_module, "ensure_universal", fake_conversion([]))
    engine = FakeEngine(rank=1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    manager(tmp_path).load(engine, point)
    assert torch.equal(torch.rand(3), expected)
    assert caplog.messages == [f"{point.path} has no RNG state for rank 1 (saved on 1 ranks); keeping this rank's "
                               "seeded generators"]


# ---------------------------------------------------------------- what a checkpoint restores


def fake_conversion(calls: list):
    """``ensure_universal`` without DeepSpeed's converter: the universal folder holds the module,
    optimizer and scheduler state as the fake engine reads them."""
    import shutil

    def convert(step_dir, timeout_s):
        calls.append((Path(step_dir), timeout_s))
        out = Path(step_dir) / "universal"
        out.mkdir(exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "mp_rank_00_optim_states.pt"):
            shutil.copy(Path(step_dir) / name, out / name)
        return out
    return convert


def test_the_optimizer_and_lr_scheduler_state_are_restored(tmp_path):
    engine = FakeEngine()
    engine.train_step()
    engine.train_step()
    manager(tmp_path).save(engine, 2)
    fresh, mgr = FakeEngine(), manager(tmp_path)
    mgr.load(fresh, mgr.find_resume_point())
    assert fresh.optimizer.param_groups[0]["lr"] == engine.optimizer.param_groups[0]["lr"] == 0.025
    assert fresh.lr_scheduler.last_epoch == 2
    for old, new in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(fresh.optimizer.state[new]["exp_avg"], engine.optimizer.state[old]["exp_avg"])
    assert fresh._config.load_universal_checkpoint is False  # the engine's own setting, put back


def test_the_optimizer_groups_hyperparameters_are_recorded(tmp_path):
    engine = FakeEngine()
    engine.optimizer.param_groups[1]["note"] = ["decay", None, 1]
    # A capturable optimizer may hold tensors (lr, betas): not JSON, left out rather than failing the save.
    engine.optimizer.param_groups[1]["lr"] = torch.tensor(0.1)
    engine.optimizer.param_groups[1]["betas"] = (torch.tensor(0.8), 0.9)
    groups = json.loads((manager(tmp_path).save(engine, 2) / "optimizer_groups.json").read_text())
    expected = {"amsgrad": False, "betas": [0.8, 0.9], "capturable": False, "decoupled_weight_decay": True,
                "differentiable": False, "eps": 1e-08, "foreach": None, "fused": None, "initial_lr": 0.1,
                "lr": 0.1, "maximize": False, "weight_decay": 0.01}
    assert groups[0] == {k: v for k, v in expected.items() if k in engine.optimizer.param_groups[0]}
    assert groups[1] == {**{k: v for k, v in groups[0].items() if k not in ("lr", "betas")},
                         "weight_decay": 0.0, "note": ["decay", None, 1]}


def test_a_universal_resume_restores_every_groups_hyperparameters_and_a_step_per_state(tmp_path, monkeypatch, caplog):
    """Saved on 2 ranks, resumed on 1: DeepSpeed's universal loader gives every group group 0's
    weight decay and one shared Adam step; the manager puts the saved groups back and gives each
    state its own step, so the bias stays undecayed and every bias correction advances once."""
    import logging

    root = tmp_path / "checkpoints"
    engine = FakeEngine(init=0.5)
    engine.train_step()
    as_rank(monkeypatch, Group(rank=0, on_reduce=peer_writes(root, 2)))
    manager(tmp_path, conversion_timeout_s=77).save(engine, 2)

    monkeypatch.setattr(manager_module, "dist", OneRank)
    monkeypatch.setattr(manager_module, "collectives", collectives)
    calls = []
    monkeypatch.setattr(manager_module, "ensure_universal", fake_conversion(calls))
    caplog.set_level(logging.INFO, logger=manager_module.__name__)
    mgr = manager(tmp_path, conversion_timeout_s=77)
    point = mgr.find_resume_point()
    fresh = FakeEngine()
    assert mgr.load(fresh, point) == {"step": 2}
    step_dir = Path(point.path)
    assert calls == [(step_dir, 77)]
    assert fresh.load_calls == [(str(step_dir), "universal", True)]
    assert fresh._config.load_universal_checkpoint is False
    assert f"{step_dir} was saved on 2 ranks, resuming on 1: loading a universal checkpoint" in caplog.messages
    assert [g["weight_decay"] for g in fresh.optimizer.param_groups] == [0.01, 0.0]
    assert [g["betas"] for g in fresh.optimizer.param_groups] == [(0.8, 0.9), (0.8, 0.9)]
    assert torch.equal(fresh.module.weight, engine.module.weight)
    weight_step, bias_step = (fresh.optimizer.state[p]["step"] for p in (fresh.module.weight, fresh.module.bias))
    weight_step += 1  # what torch's Adam does, in place
    assert (weight_step.item(), bias_step.item()) == (2.0, 1.0)


def test_a_universal_resume_into_another_number_of_param_groups_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    as_rank(monkeypatch, Group(rank=0, on_reduce=peer_writes(root, 2)))
    manager(tmp_path).save(FakeEngine(), 2)
    monkeypatch.setattr(manager_module, "dist", OneRank)
    monkeypatch.setattr(manager_module, "collectives", collectives)
    monkeypatch.setattr(manager_module, "ensure_universal", fake_conversion([]))
    mgr = manager(tmp_path)
    point = mgr.find_resume_point()
    (root / "step-2" / "optimizer_groups.json").write_text(json.dumps([{"lr": 0.1}]))
    with pytest.raises(CheckpointError, match="step-2: checkpoint has 1 optimizer param groups, this job has 2$"):
        mgr.load(FakeEngine(), point)


@pytest.mark.parametrize("on_device", [False, True])
def test_own_step_places_the_step_as_torchs_load_state_dict_does(on_device):
    """Fused and capturable AdamW refuse a step off the parameter's device or not in fp32; the
    others keep it as saved. (The meta device stands in for the GPU the moments live on.)"""
    param = moment = torch.zeros(2, device="meta")
    saved = torch.tensor(3.0, dtype=torch.float64)
    expected = torch.optim.Optimizer._process_value_according_to_param_policy(
        param, saved, 0, [{"params": [0], "capturable": on_device}], key="step")
    step = manager_module.own_step(saved, moment, on_device)
    assert (step.dtype, step.device) == (expected.dtype, expected.device)
    assert step.device.type == "meta" or (step.item() == 3.0 and step.data_ptr() != saved.data_ptr())
    assert manager_module.own_step(saved, None, on_device).dtype == torch.float64  # no moment: as saved


@pytest.mark.parametrize("flag", ["fused", "capturable"])
def test_a_universal_resume_puts_the_steps_where_a_fused_or_capturable_adamw_wants_them(tmp_path, monkeypatch, flag):
    class DoubleStep(FakeEngine):  # a loader that hands over a float64 step
        def load_checkpoint(self, *args, **kwargs):
            out = super().load_checkpoint(*args, **kwargs)
            for state in self.optimizer.state.values():
                state["step"] = state["step"].double()
            return out

    def universal_resume(run_dir, flag, fresh):
        engine = FakeEngine()
        engine.train_step()
        for target in (engine, fresh):
            for group in target.optimizer.param_groups[1:] if flag else ():
                group[flag] = True  # the job's optimizer is fused/capturable (only the bias group suffices)
        as_rank(monkeypatch, Group(rank=0, on_reduce=peer_writes(run_dir / "checkpoints", 2)))
        manager(run_dir).save(engine, 2)
        monkeypatch.setattr(manager_module, "dist", OneRank)
        monkeypatch.setattr(manager_module, "collectives", collectives)
        mgr = manager(run_dir)
        mgr.load(fresh, mgr.find_resume_point())
        return [fresh.optimizer.state[p]["step"] for p in (fresh.module.weight, fresh.module.bias)]

    monkeypatch.setattr(manager_module, "ensure_universal", fake_conversion([]))
    assert {s.dtype for s in universal_resume(tmp_path / "device", flag, DoubleStep())} == {torch.float32}
    assert {s.dtype for s in universal_resume(tmp_path / "plain", None, DoubleStep())} == {torch.float64}
    # Already fp32 on the right device, the shared step still becomes one per state.
    weight_step, bias_step = universal_resume(tmp_path / "fp32", flag, FakeEngine())
    weight_step += 1
    assert (weight_step.item(), bias_step.item()) == (2.0, 1.0)


# ---------------------------------------------------------------- identity, retention, pins


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_checkpoint_of_another_precision_is_refused_at_load(tmp_path, precision):
    step_dir = manager(tmp_path).save(FakeEngine(precision=precision), 2)
    assert json.loads((step_dir / MARKER).read_text())["precision"] == precision
    mgr = manager(tmp_path)
    point = mgr.find_resume_point()
    with pytest.raises(CheckpointError) as caught:
        mgr.load(FakeEngine(hidden=4), point)
    assert str(caught.value) == (
        f"checkpoint {point.path} does not match this job:\n"
        f"  - precision: checkpoint has {precision!r}, this job has 'fp32'\n"
        f"  - parameter count: checkpoint has 9, this model has 12\n"
        f"  - parameter bias: checkpoint shape [3], model shape [4]\n"
        f"  - parameter weight: checkpoint shape [3, 2], model shape [4, 2]")


def test_zero3_records_the_full_shapes_of_partitioned_parameters(tmp_path):
    """Under ZeRO-3 each rank holds an empty placeholder; ``ds_shape`` is the real shape."""
    engine = FakeEngine(stage=3)
    for p in engine.module.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    step_dir = manager(tmp_path).save(engine, 2)
    assert json.loads((step_dir / "params.json").read_text()) == {"weight": [3, 2], "bias": [3]}
    assert json.loads((step_dir / MARKER).read_text())["param_count"] == 9


def test_the_marker_records_the_commit_time_and_versions(tmp_path):
    import deepspeed

    before = __import__("time").time()
    marker = json.loads((manager(tmp_path).save(FakeEngine(), 2) / MARKER).read_text())
    assert before <= marker["time"] <= __import__("time").time()
    assert (marker["deepspeed_version"], marker["torch_version"]) == (deepspeed.__version__, torch.__version__)


def test_a_new_run_at_an_existing_step_replaces_that_checkpoint(tmp_path):
    """Only this process's own last save is skipped: another run's step-N is overwritten."""
    manager(tmp_path).save(FakeEngine(init=0.5), 2)
    manager(tmp_path).save(FakeEngine(init=1.0), 2)
    mgr, fresh = manager(tmp_path), FakeEngine()
    mgr.load(fresh, mgr.find_resume_point())
    assert torch.equal(fresh.module.weight, torch.full((3, 2), 1.0))


def test_a_save_creates_a_run_dir_that_does_not_exist_yet(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    assert manager(run_dir).save(FakeEngine(), 2) == run_dir / "checkpoints" / "step-2"
    assert read_latest(run_dir / "checkpoints") == "step-2"


def test_a_save_right_after_resuming_at_that_step_is_skipped(tmp_path):
    step_dir = manager(tmp_path).save(FakeEngine(), 2)
    before = (step_dir / MARKER).stat().st_mtime_ns
    mgr = manager(tmp_path)
    mgr.load(FakeEngine(), mgr.find_resume_point())
    mgr.save(FakeEngine(), 2)  # preempted before the first step after the resume
    assert (step_dir / MARKER).stat().st_mtime_ns == before


def test_after_resuming_an_older_checkpoint_the_abandoned_continuation_is_rotated_out(tmp_path):
    """Recency is the commit, not the step: after going back to step 4, the old step-6 is older
    than the new step-5 and step-7, and a re-saved step-6 replaces the abandoned one."""
    root = tmp_path / "checkpoints"
    first = manager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        first.save(FakeEngine(init=float(step)), step)
    mgr = manager(tmp_path, keep_last=2)
    mgr.load(FakeEngine(), mgr.find_resume_point(str(root / "step-4")))
    mgr.save(FakeEngine(init=5.0), 5)
    mgr.save(FakeEngine(init=7.0), 7)
    assert [c.step for c in complete_checkpoints(root)] == [5, 7]
    mgr = manager(tmp_path, keep_last=3)
    mgr.load(FakeEngine(), mgr.find_resume_point(str(root / "step-5")))
    mgr.save(FakeEngine(init=-6.0), 7)
    fresh, mgr = FakeEngine(), manager(tmp_path)
    mgr.load(fresh, mgr.find_resume_point())
    assert torch.equal(fresh.module.weight, torch.full((3, 2), -6.0))


def test_the_checkpoint_just_saved_survives_a_clock_stepped_back(tmp_path, monkeypatch):
    """Commit order comes from the wall clock; after NTP steps it back, the new checkpoint looks
    older than the previous one, yet retention must not delete the checkpoint `latest` names."""
    import time

    clock = iter([1000.0, 500.0])
    monkeypatch.setattr(manager_module, "time", SimpleNamespace(time=lambda: next(clock), monotonic=time.monotonic))
    mgr = manager(tmp_path, keep_last=1)
    mgr.save(FakeEngine(), 2)
    mgr.save(FakeEngine(), 4)
    root = tmp_path / "checkpoints"
    assert read_latest(root) == "step-4" and (root / "step-4" / MARKER).is_file()


def test_without_keep_best_an_old_best_is_rotated_out(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger=manager_module.__name__)
    mgr, engine = manager(tmp_path, keep_last=1, keep_best=False), FakeEngine()
    mgr.record_eval(2, {"a": 1.0})
    mgr.save(engine, 2)
    mgr.record_eval(4, {"a": 0.5})
    mgr.save(engine, 4)
    assert [c.step for c in complete_checkpoints(tmp_path / "checkpoints")] == [4]
    assert f"retention: deleting {tmp_path / 'checkpoints' / 'step-2'}" in caplog.messages


def test_a_tie_keeps_the_earlier_best(tmp_path):
    mgr = manager(tmp_path)
    assert mgr.record_eval(2, {"a": 0.5}) == ["a"]
    assert mgr.record_eval(4, {"a": 0.5}) == []  # no extra save for an equal score
    assert mgr.best == {"a": {"step": 2, "score": 0.5}}


def test_only_rank_0_writes_best_json(tmp_path, monkeypatch):
    as_rank(monkeypatch, Group(rank=1))
    mgr = manager(tmp_path)
    assert mgr.record_eval(2, {"a": 0.5}) == ["a"]
    assert mgr.best == {"a": {"step": 2, "score": 0.5}}  # the same view as rank 0
    assert not (tmp_path / "checkpoints").exists()
    as_rank(monkeypatch, Group(rank=0))
    assert manager(tmp_path).record_eval(2, {}) == []
    assert not (tmp_path / "checkpoints").exists()  # nothing improved, nothing written


def test_due_at_every_step_with_interval_1(tmp_path):
    assert [s for s in range(0, 4) if manager(tmp_path, interval=1).due(s)] == [1, 2, 3]


def test_the_same_world_size_resumes_when_conversion_is_off(tmp_path):
    manager(tmp_path).save(FakeEngine(), 2)
    point = manager(tmp_path, convert_universal="never").find_resume_point()
    assert point.step == 2 and not manager(tmp_path).needs_universal(point)


def test_every_reason_a_checkpoint_is_refused_is_listed(tmp_path):
    manager(tmp_path).save(FakeEngine(), 2)
    step_dir = tmp_path / "checkpoints" / "step-2"
    marker = json.loads((step_dir / MARKER).read_text())
    (step_dir / MARKER).write_text(json.dumps({**marker, "world_size": 2}))
    other = CheckpointManager(CheckpointConfig(convert_universal="never"), tmp_path, model_config={"hidden": 4})
    with pytest.raises(CheckpointError) as caught:
        other.find_resume_point()
    assert str(caught.value) == (
        f"checkpoint {step_dir} does not match this job:\n"
        "  - model config hidden: checkpoint has 3, this job has 4\n"
        "  - world size: saved on 2 ranks, this job has 1, and checkpoint.convert_universal is 'never'; "
        f"convert it first with `hp-deepspeed convert-universal {step_dir}`")


def test_a_stale_latest_pointer_is_reported_and_a_fresh_start_logged(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger=manager_module.__name__)
    root = tmp_path / "checkpoints"
    assert manager(tmp_path).find_resume_point() is None
    assert caplog.messages == [f"resume=auto: no complete checkpoint under {root}, starting fresh"]
    mgr = manager(tmp_path, keep_last=3)
    mgr.save(FakeEngine(), 2)
    mgr.save(FakeEngine(), 4)
    (root / "latest").write_text("step-6\n")  # names a folder that is gone
    caplog.clear()
    assert manager(tmp_path).find_resume_point().step == 4
    assert caplog.messages == [f"{root}/latest names 'step-6', which is missing, incomplete or older than step-4; "
                               "using step-4"]
    caplog.clear()
    assert manager(tmp_path).find_resume_point(str(root / "step-2")).step == 2
    assert manager(tmp_path, resume="none").find_resume_point() is None
    assert caplog.messages == []  # an explicit choice is not second-guessed


def test_deepspeed_finding_no_files_is_an_error(tmp_path):
    class NothingFound(FakeEngine):
        def load_checkpoint(self, *args, **kwargs):
            return None, None

    manager(tmp_path).save(FakeEngine(), 2)
    mgr = manager(tmp_path)
    with pytest.raises(CheckpointError, match="step-2: DeepSpeed found no checkpoint files to load$"):
        mgr.load(NothingFound(), mgr.find_resume_point())


def test_the_logged_save_duration_is_the_time_the_save_took(tmp_path, caplog):
    import logging
    import re
    import time

    caplog.set_level(logging.INFO, logger=manager_module.__name__)
    started = time.monotonic()
    manager(tmp_path).save(FakeEngine(), 2)
    took = time.monotonic() - started
    (seconds,) = [float(m) for m in re.findall(r"^saved checkpoint .* in (\S+)s$", "\n".join(caplog.messages), re.M)]
    assert 0 <= seconds <= took + 0.05


@pytest.mark.parametrize("universal", [True, False])
def test_a_resume_keeps_the_resuming_jobs_optimizer_implementation(tmp_path, monkeypatch, universal):
    """A checkpoint of a job whose AdamW was not fused (a CPU job), resumed by a job whose AdamW
    is fused (a GPU job), natively or through universal: the hyperparameters come back, the
    implementation stays the resuming job's, and the Adam steps are placed for it."""
    engine = FakeEngine()
    engine.train_step()
    for group in engine.optimizer.param_groups:
        group["lr"], group["fused"], group["foreach"] = 0.5, False, True
    as_rank(monkeypatch, Group(rank=0, on_reduce=peer_writes(tmp_path / "checkpoints", 2)))
    manager(tmp_path).save(engine, 2)
    monkeypatch.setattr(manager_module, "dist", OneRank)
    monkeypatch.setattr(manager_module, "collectives", collectives)
    monkeypatch.setattr(manager_module, "ensure_universal", fake_conversion([]))
    monkeypatch.setattr(CheckpointManager, "needs_universal", lambda self, point: universal)
    fresh = FakeEngine()
    for group in fresh.optimizer.param_groups:
        group["lr"], group["fused"], group["foreach"] = 0.1, True, False
    mgr = manager(tmp_path)
    mgr.load(fresh, mgr.find_resume_point())
    groups = fresh.optimizer.param_groups
    assert [(g["lr"], g["fused"], g["foreach"]) for g in groups] == [(0.5, True, False)] * len(groups)
    if universal:  # fp32 steps, one per state, where the fused AdamW wants them
        steps = [state["step"] for state in fresh.optimizer.state.values()]
        assert {s.dtype for s in steps} == {torch.float32} and len({s.data_ptr() for s in steps}) == len(steps)


# ---------------------------------------------------------------- verification before trust


def two_checkpoints(tmp_path, stage: int = 3) -> Path:
    mgr = manager(tmp_path, keep_last=3)
    mgr.save(FakeEngine(stage=stage, init=2.0), 2, {"data": {"position": 2}})
    mgr.save(FakeEngine(stage=stage, init=4.0), 4, {"data": {"position": 4}})
    return tmp_path / "checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


CORRUPTIONS = {
    "truncated optimizer shard": ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", truncate,
                                  r"\d+ bytes, the manifest says \d+"),
    "zero-filled model states": ("zero_pp_rank_0_mp_rank_00_model_states.pt", zero_fill,
                                 r"content differs from the manifest \(xxh3_128\)"),
    "trainer_state.json cut mid-file": ("trainer_state.json", truncate, r"\d+ bytes, the manifest says \d+"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_is_skipped_with_one_warning_naming_the_file(tmp_path, caplog, case):
    import logging

    name, corrupt, problem = CORRUPTIONS[case]
    root = two_checkpoints(tmp_path)
    corrupt(root / "step-4" / name)
    caplog.set_level(logging.INFO, logger=manager_module.__name__)
    mgr, fresh = manager(tmp_path), FakeEngine(stage=3)
    point = mgr.find_resume_point()
    assert point.step == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert re.fullmatch(rf"checkpoint step-4 fails verification \({root / 'step-4' / name}: {problem}\); "
                        r"resuming from step-2 instead", warning), warning
    assert mgr.load(fresh, point) == {"data": {"position": 2}, "step": 2}
    assert torch.equal(fresh.module.weight, torch.full((3, 2), 2.0))
    assert (root / "step-4" / name).is_file()  # evidence kept: nothing is deleted on suspicion


def test_latest_holding_binary_junk_is_the_same_as_missing(tmp_path, caplog):
    import logging

    root = two_checkpoints(tmp_path)
    caplog.set_level(logging.WARNING, logger=manager_module.__name__)
    for junk in (b"\xff\xfe\x00\x81garbage\n", b"step-4\x00\x00", "stép-2".encode()):
        (root / "latest").write_bytes(junk)
        assert read_latest(root) is None
        assert manager(tmp_path).find_resume_point().step == 4
    assert caplog.messages == []
    for path in root.iterdir():
        if path.name.startswith("step-"):
            shutil.rmtree(path)
    (root / "latest").write_bytes(b"\x80\x81")
    assert manager(tmp_path).find_resume_point() is None  # nothing to resume: a fresh start


def test_when_no_checkpoint_verifies_one_error_names_each(tmp_path):
    root = two_checkpoints(tmp_path)
    zero_fill(root / "step-4" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    truncate(root / "step-2" / "trainer_state.json")
    with pytest.raises(CheckpointError) as caught:
        manager(tmp_path).find_resume_point()
    assert str(caught.value) == (
        f"{root}: no checkpoint passes verification: "
        f"step-4: {root}/step-4/zero_pp_rank_0_mp_rank_00_model_states.pt: content differs from the manifest (xxh3_128); "
        f"step-2: {root}/step-2/trainer_state.json: 25 bytes, the manifest says 51")
    with pytest.raises(CheckpointError, match=r"^.*step-2 fails verification: .*trainer_state.json: 25 bytes"):
        manager(tmp_path).find_resume_point(str(root / "step-2"))  # an explicit choice is not swapped


def test_a_tampered_manifest_and_a_missing_file_fail_verification(tmp_path):
    root = two_checkpoints(tmp_path)
    manifest = root / "step-4" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"size": ', '"size": 1'))
    (root / "step-2" / "params.json").unlink()
    with pytest.raises(CheckpointError) as caught:
        manager(tmp_path).find_resume_point()
    assert f"step-4: {manifest}: content differs from the digest recorded in step-4/COMPLETE" in str(caught.value)
    assert f"step-2: {root}/step-2/params.json: missing" in str(caught.value)


def test_files_no_ledger_recorded_are_adopted_and_a_peers_verification_problem_skips_the_step(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    as_rank(monkeypatch, Group(rank=0, on_reduce=peer_writes(root, 2, stage=3)))
    manager(tmp_path).save(FakeEngine(stage=3), 2)
    files = json.loads((root / "step-2" / "manifest.json").read_text())["files"]
    assert {rel: entry["rank"] for rel, entry in files.items() if "zero_pp_rank" in rel} == {
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": 0, "zero_pp_rank_0_mp_rank_00_model_states.pt": 0,
        # rank 1's files reached the folder without going through a ledger here: rank 0 adopted them
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 0, "zero_pp_rank_1_mp_rank_00_model_states.pt": 0}
    assert (manager(tmp_path).find_resume_point()).step == 2
    # What rank 1 finds in its share is every rank's verdict.
    group = as_rank(monkeypatch, Group(rank=0, peer_problem="/x/zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"))
    with pytest.raises(CheckpointError, match="no checkpoint passes verification: step-2: /x/zero_pp_rank_1_.*: missing$"):
        manager(tmp_path).find_resume_point()
    assert group.received[0][0] == "ok"


# ---------------------------------------------------------------- training data changed since the save


def test_a_training_file_changed_since_the_checkpoint_is_refused_before_the_model_unless_accepted(tmp_path, caplog):
    import logging

    data = tmp_path / "train.jsonl"
    data.write_text('{"x": 1}\n{"x": 2}\n')

    def with_data(**config):
        return CheckpointManager(CheckpointConfig(**config), tmp_path, model_config=MODEL_CONFIG,
                                 data_files={"glue/rte": data})

    with_data().save(FakeEngine(), 2)
    assert json.loads((tmp_path / "checkpoints" / "step-2" / MARKER).read_text())["data_files"]["glue/rte"]["size"] == 18
    os.utime(data, ns=(1, 1))  # copied or touched: same bytes, another mtime
    assert with_data().find_resume_point().step == 2
    data.write_text('{"x": 1}\n{"x": 2}\n{"x": 3}\n')
    with pytest.raises(CheckpointError) as caught:
        with_data().find_resume_point()
    assert str(caught.value) == (
        f"checkpoint {tmp_path / 'checkpoints' / 'step-2'} does not match this job:\n"
        f"  - training file of glue/rte: {data} has 27 bytes, 18 when the checkpoint was saved; "
        "set checkpoint.accept_changed_data=true to resume anyway")
    data.write_text('{"x": 1}\n{"x": 9}\n')
    with pytest.raises(CheckpointError, match="has the same size but other content than when the checkpoint was saved"):
        with_data().find_resume_point()
    caplog.set_level(logging.WARNING, logger=manager_module.__name__)
    assert with_data(accept_changed_data=True).find_resume_point().step == 2
    assert caplog.messages == [f"resuming {tmp_path / 'checkpoints' / 'step-2'} with changed training data "
                               f"(checkpoint.accept_changed_data): training file of glue/rte: {data} has the same "
                               "size but other content than when the checkpoint was saved"]
    data.unlink()
    with pytest.raises(CheckpointError, match=f"training file of glue/rte: {data} does not exist any more"):
        with_data().find_resume_point()


def test_retention_deletes_files_off_the_critical_path_and_before_the_next_save(tmp_path, monkeypatch):
    import threading

    release, deleting = threading.Event(), []
    real = manager_module.delete_trees

    def slow_delete(folders):
        deleting.extend(folders)
        release.wait(10)
        real(folders)

    monkeypatch.setattr(manager_module, "delete_trees", slow_delete)
    root = tmp_path / "checkpoints"
    mgr = manager(tmp_path, keep_last=1)
    mgr.save(FakeEngine(), 2)
    mgr.save(FakeEngine(), 4)  # returns while step-2's files are still being deleted
    assert deleting == [root / "step-2.trash"] and (root / "step-2.trash").is_dir()
    assert [c.step for c in complete_checkpoints(root)] == [4] and not (root / "step-2").exists()
    threading.Timer(0.2, release.set).start()
    mgr.save(FakeEngine(), 6)  # waits for the deletion before touching the folder
    assert not (root / "step-2.trash").exists()
    mgr.finish_deletions()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-6"]


def test_a_run_dir_rank_0_cannot_create_stops_every_rank_before_deepspeeds_collectives(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    group = as_rank(monkeypatch, Group(rank=0))
    engine = FakeEngine()
    with pytest.raises(CheckpointError) as caught:
        manager(tmp_path / "file" / "run").save(engine, 2)
    assert str(caught.value) == (
        f"checkpoint step-2 not saved:\n  - rank 0 could not write {tmp_path}/file/run/checkpoints: not a directory")
    assert engine.save_latest_args == [] and group.reduced == []  # DeepSpeed's save never started


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied"), (errno.EDQUOT, "disk quota exceeded")])
def test_resource_errors_are_named_in_words_with_their_path(code, words):
    assert integrity.describe_os_error(OSError(code, os.strerror(code), "/ckpt/x.pt")) == f"/ckpt/x.pt: {words}"
    assert integrity.describe_os_error(OSError(code, os.strerror(code)), "/ckpt/y.pt") == f"/ckpt/y.pt: {words}"
    ledger = integrity.SaveLedger("/ckpt", 3)
    ledger.fail("/ckpt/z.pt", OSError(code, os.strerror(code)))
    assert integrity.failure_lines(ledger.report.failures) == [f"rank 3 could not write /ckpt/z.pt: {words}"]



def test_a_failed_copy_is_reported_against_the_file_being_written_not_its_source():
    # shutil's copy sets filename to the source and filename2 to the destination of a failed write.
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/venv/deepspeed/zero_to_fp32.py", None,
                  "/ckpt/step-2.staging/zero_to_fp32.py")
    ledger = integrity.SaveLedger("/ckpt", 0)
    ledger.guard("/ckpt/step-2.staging", lambda: (_ for _ in ()).throw(err))
    assert integrity.failure_lines(ledger.report.failures) == [
        "rank 0 could not write /ckpt/step-2.staging/zero_to_fp32.py: no space left on device"]
