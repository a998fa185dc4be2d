"""The resume's read path: the verification digest read from a memory map, and DeepSpeed's files
loaded memory-mapped without any tensor of the run left on the mapping."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch
import xxhash

from hp_deepspeed.checkpointing import integrity
from hp_deepspeed.checkpointing.integrity import digest_file
from hp_deepspeed.compat.checkpoint import mmap_loading
from hp_deepspeed.testing.ranks import run_ranks


def _mapped(path: Path) -> bool:
    """Whether this process holds a memory mapping of ``path``."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("size", [0, 1, 5, 4096, 3 * 64 + 7])
def test_the_digest_is_the_xxh3_of_every_byte_across_chunk_edges(tmp_path, monkeypatch, size):
    monkeypatch.setattr(integrity, "READ_CHUNK", 64)
    data = bytes((i * 7) % 251 for i in range(size))
    path = tmp_path / "f"
    path.write_bytes(data)
    assert digest_file(path) == (size, xxhash.xxh3_128(data).hexdigest())
    assert not _mapped(path)  # the mapping is closed once hashed


def test_a_file_that_cannot_be_mapped_is_digested_by_reads(tmp_path, monkeypatch):
    data = b"checkpoint bytes" * 1000
    path = tmp_path / "f"
    path.write_bytes(data)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(integrity, "READ_CHUNK", 100)
    monkeypatch.setattr(mmap, "mmap", refuse)
    assert digest_file(path) == (len(data), xxhash.xxh3_128(data).hexdigest())


class _CheckpointEngine:
    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


class _Engine:
    """What ``mmap_loading`` touches of a DeepSpeed engine: its checkpoint engine and optimizer."""

    def __init__(self, stepped: bool) -> None:
        self.module = torch.nn.Linear(64, 32)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self.checkpoint_engine = _CheckpointEngine()
        if stepped:  # Adam's moments exist before the load, as ZeRO creates them
            self.module(torch.ones(2, 64)).sum().backward()
            self.optimizer.step()

    def load_checkpoint(self, path: Path) -> None:
        state = self.checkpoint_engine.load(str(path), map_location="cpu")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


@pytest.mark.parametrize("stepped", [True, False])
def test_a_mapped_load_leaves_no_state_on_the_mapping_and_reuses_the_engines_own_moments(tmp_path, stepped):
    saved = _Engine(stepped=True)
    for _ in range(3):
        saved.module(torch.randn(2, 64)).sum().backward()
        saved.optimizer.step()
    path = tmp_path / "states.pt"
    torch.save({"module": saved.module.state_dict(), "optimizer": saved.optimizer.state_dict()}, path)

    fresh = _Engine(stepped=stepped)
    before = {key: value.data_ptr() for state in fresh.optimizer.state.values() for key, value in state.items()}
    with mmap_loading(fresh):
        assert fresh.checkpoint_engine.load.__name__ == "_torch_load_mapped"
        fresh.load_checkpoint(path)
        assert _mapped(path)  # read through a mapping while loading
    assert "load" not in vars(fresh.checkpoint_engine)  # the class's method again
    gc.collect()
    assert not _mapped(path)  # nothing the run keeps still points into the file
    for old, new in zip(saved.optimizer.state.values(), fresh.optimizer.state.values()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(old[key], new[key])
    if stepped:
        after = {key: value.data_ptr() for state in fresh.optimizer.state.values() for key, value in state.items()}
        assert after == before  # copied into the pristine tensors, no fresh allocation
    for old, new in zip(saved.module.parameters(), fresh.module.parameters()):
        assert torch.equal(old, new)


def test_a_failed_load_puts_deepspeeds_reader_back(tmp_path):
    fresh = _Engine(stepped=False)
    with pytest.raises(FileNotFoundError):
        with mmap_loading(fresh):
            fresh.load_checkpoint(tmp_path / "missing.pt")
    assert "load" not in vars(fresh.checkpoint_engine)


def zero3_load_maps_nothing_after(run_dir: str) -> dict:
    """Rank body: save a stepped ZeRO-3 toy, load it into a fresh engine through the manager, and
    report whether a checkpoint file is still mapped and whether the optimizer state matches."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from tests.checkpointing.bodies import config, train_step
    from tests.checkpointing.toy import MODEL_CONFIG, make_engine, seed
    from hp_deepspeed.checkpointing import CheckpointManager

    seed(1)
    engine = make_engine(init_seed=0)
    for step in (1, 2):
        train_step(engine, step)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    manager.save(engine, 2, {})
    saved = {n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for n, p in engine.module.named_parameters()}
    fresh = make_engine(init_seed=5)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    manager.load(fresh, manager.find_resume_point())
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    return {"mapped": [line for line in maps.splitlines() if "step-2" in line],
            "equal": all(torch.equal(saved[n], safe_get_full_optimizer_state(p, "exp_avg_sq"))
                         for n, p in fresh.module.named_parameters())}


@pytest.mark.distributed
def test_a_zero3_resume_keeps_no_mapping_of_the_checkpoint_and_restores_adams_moments(tmp_path):
    result = run_ranks("tests.checkpointing.test_load_path:zero3_load_maps_nothing_after", 1, timeout=180,
                       args=(str(tmp_path),))[0]
    assert result == {"mapped": [], "equal": True}
