"""The resume's read path: the verification digest read from a memory map; the single pass that
reads a torch file into private buffers while hashing it, and the load over that verified copy;
DeepSpeed's other files loaded memory-mapped without any tensor of the run left on the mapping."""

from __future__ import annotations

import errno
import gc
import mmap
import os
from pathlib import Path

import pytest
import torch
import xxhash

from hp_deepspeed.checkpointing import integrity, preload
from hp_deepspeed.checkpointing.integrity import digest_file, verify
from hp_deepspeed.compat.checkpoint import load_held, mmap_loading
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


def _held_once(path: Path) -> tuple[preload.HeldFile, str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return preload.read_held(path, preload.record_spans(fd, size), fd, size)
    finally:
        os.close(fd)


def test_one_read_holds_every_record_in_its_own_buffer_hashes_the_whole_file_and_loads_without_the_disk(
        tmp_path, monkeypatch):
    monkeypatch.setattr(preload, "OWN_BUFFER", 4096)
    monkeypatch.setattr(preload, "CHUNK", 5000)  # chunk edges inside records and headers
    state = {"big": torch.randn(3000), "also": torch.arange(2000, dtype=torch.int64), "small": torch.ones(3),
             "view": None, "step": 7}
    state["view"] = state["big"][10:20]  # shares the storage of "big"
    path = tmp_path / "state.pt"
    torch.save(state, path)
    data = path.read_bytes()

    held, digest = _held_once(path)
    assert digest == xxhash.xxh3_128(data).hexdigest()
    assert b"".join(bytes(buffer) for _, buffer in held.pieces) == data
    assert len(held.records) == 2  # "big" and "also"; "small" and the headers stay in byte strings
    path.write_bytes(bytes(len(data)))  # the load reads nothing from the disk any more
    loaded = load_held(held, map_location="cpu")
    for key in ("big", "also", "small", "view"):
        assert torch.equal(loaded[key], state[key])
    assert loaded["step"] == 7
    assert loaded["view"].untyped_storage().data_ptr() == loaded["big"].untyped_storage().data_ptr()
    assert {loaded["big"].untyped_storage().data_ptr(),
            loaded["also"].untyped_storage().data_ptr()} == held.private_pointers()  # no copy made


def test_a_direct_read_holds_and_hashes_the_same_bytes_as_a_read_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(preload, "OWN_BUFFER", 4096)
    monkeypatch.setattr(preload, "DIRECT_CHUNK", 8192)  # request edges inside records, records off block edges
    monkeypatch.setattr(preload, "DIRECT_READERS", 3)
    state = {"big": torch.randn(5001), "small": torch.ones(3), "also": torch.arange(3001, dtype=torch.int64)}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        spans = preload.record_spans(fd, len(data))
        assert any(start % preload.ALIGN for start, _ in spans)
        monkeypatch.setattr(preload, "DIRECT", True)
        direct_pieces = preload._layout(spans, len(data))
        try:
            direct = preload._read_direct(path, direct_pieces, len(data))
        except OSError as err:
            pytest.skip(f"{tmp_path}: no direct reads here ({err})")
        held, digest = preload.read_held(path, spans, fd, len(data))
        monkeypatch.setattr(preload, "DIRECT", False)
        cached, cached_digest = preload.read_held(path, spans, fd, len(data))
    finally:
        os.close(fd)
    assert direct == digest == cached_digest == xxhash.xxh3_128(data).hexdigest()
    assert b"".join(bytes(piece.view()) for piece in direct_pieces) == data
    assert b"".join(bytes(buffer) for _, buffer in held.pieces) == data
    assert sorted(held.records) == sorted(cached.records) == [start for start, _ in spans]
    loaded = load_held(held, map_location="cpu")
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert {loaded[key].untyped_storage().data_ptr() for key in ("big", "also")} == held.private_pointers()


def test_a_direct_read_of_a_file_shorter_than_expected_names_the_byte_it_ended_at(tmp_path, monkeypatch):
    monkeypatch.setattr(preload, "DIRECT_CHUNK", 8192)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 100)  # 25600 bytes; 30000 expected
    try:
        with pytest.raises(OSError, match=f"{path}: file ended at byte 25600, expected 30000 bytes"):
            preload._read_direct(path, preload._layout([], 30000), 30000)
    except OSError as err:  # open itself refused: no direct reads on this file system
        pytest.skip(f"{tmp_path}: no direct reads here ({err})")


def test_a_flipped_byte_is_refused_by_the_single_read_and_nothing_of_the_file_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(preload, "OWN_BUFFER", 4096)
    folder = tmp_path / "step-1"
    folder.mkdir()
    path = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"exp_avg": torch.randn(5000)}, path)
    entry = {"size": path.stat().st_size, "digest": digest_file(path)[1], "rank": 0}
    text = integrity.manifest_text({"algorithm": integrity.ALGORITHM, "files": {path.name: entry}})
    (folder / integrity.MANIFEST).write_text(text)
    marker = {"manifest": integrity.text_digest(text)}

    held: dict = {}
    assert verify(folder, marker, held=held) is None
    assert list(held) == [os.path.realpath(path)]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor's bytes: torch itself would load it silently
    path.write_bytes(bytes(data))
    held = {}
    assert verify(folder, marker, held=held) == f"{path}: content differs from the manifest (xxh3_128)"
    assert held == {}


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


def zero3_resume_reads_once(run_dir: str) -> dict:
    """Rank body: save a stepped ZeRO-3 toy at steps 2 and 4, flip one byte of step 4's optimizer
    shard, and resume a fresh engine. Once step 2 is verified its shards on disk are zeroed: the
    load must use the copy the verification read. Reports what was resumed and how, and whether
    training on replays the original steps exactly."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from tests.checkpointing.bodies import config, train_step
    from tests.checkpointing.toy import MODEL_CONFIG, make_engine, seed
    from hp_deepspeed.checkpointing import CheckpointManager

    preload.OWN_BUFFER = 1  # the toy's records are small: give each its own buffer, as t5's get
    preload.DIRECT = True  # and read them as a cold t5 file is read (where the file system allows)
    seed(1)
    engine = make_engine(init_seed=0)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    for step in (1, 2):
        train_step(engine, step)
    manager.save(engine, 2, {})
    saved = {n: (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
             for n, p in engine.module.named_parameters()}
    losses = [train_step(engine, step) for step in (3, 4)]
    manager.save(engine, 4, {})
    after = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    root = Path(run_dir) / "checkpoints"
    shard = root / "step-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    with shard.open("rb") as fh:
        start, nbytes = max(preload.record_spans(fh.fileno(), len(data)), key=lambda span: span[1])
    data[start + nbytes // 2] ^= 0x01  # inside a tensor, same size: only the digest can tell
    shard.write_bytes(bytes(data))

    fresh = make_engine(init_seed=5)
    manager = CheckpointManager(config(), run_dir, model_config=MODEL_CONFIG)
    point = manager.find_resume_point()
    read_into = set().union(*(file.private_pointers() for file in manager._held[1].values()))
    for path in (root / "step-2").glob("*.pt"):
        path.write_bytes(bytes(path.stat().st_size))
    manager.load(fresh, point)
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    state = fresh.optimizer.optimizer.state
    result = {"step": point.step,
            "mapped": [line for line in maps.splitlines() if "step-" in line],
            "equal": all(torch.equal(saved[n][0], safe_get_full_fp32_param(p))
                         and torch.equal(saved[n][1], safe_get_full_optimizer_state(p, "exp_avg_sq"))
                         for n, p in fresh.module.named_parameters()),
            "moments_in_read_buffers": bool(state) and all(
                s[key].untyped_storage().data_ptr() in read_into for s in state.values()
                for key in ("exp_avg", "exp_avg_sq")),
            "master_in_read_buffers": all(flat.untyped_storage().data_ptr() in read_into
                                          for flat in fresh.optimizer.fp32_partitioned_groups_flat)}
    # Training on from the adopted buffers replays the original steps 3 and 4 bit for bit.
    result["replayed"] = [train_step(fresh, step) for step in (3, 4)] == losses and all(
        torch.equal(after[n], safe_get_full_fp32_param(p)) for n, p in fresh.module.named_parameters())
    return result


@pytest.mark.distributed
def test_a_zero3_resume_skips_a_flipped_byte_and_loads_the_verified_copy_uncopied_unmapped_and_exact(tmp_path):
    result = run_ranks("tests.checkpointing.test_load_path:zero3_resume_reads_once", 1, timeout=180,
                       args=(str(tmp_path),))[0]
    assert result == {"step": 2, "mapped": [], "equal": True, "moments_in_read_buffers": True,
                      "master_in_read_buffers": True, "replayed": True}


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EIO])
def test_a_file_system_refusing_direct_reads_in_any_way_is_read_through_the_page_cache(tmp_path, monkeypatch, refusal):
    """A refusal of O_DIRECT must not make a good checkpoint look unreadable (the resume would
    fall back to an older one): the read is retried through the page cache."""
    state = {"big": torch.randn(5001)}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    data = path.read_bytes()
    real_open = os.open

    def refusing_open(file, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(refusal, os.strerror(refusal), str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(preload, "OWN_BUFFER", 4096)
    monkeypatch.setattr(preload, "DIRECT", True)
    monkeypatch.setattr(preload.os, "open", refusing_open)
    fd = real_open(path, os.O_RDONLY)
    try:
        held, digest = preload.read_held(path, preload.record_spans(fd, len(data)), fd, len(data))
    finally:
        os.close(fd)
    assert digest == xxhash.xxh3_128(data).hexdigest()
    assert torch.equal(load_held(held, map_location="cpu")["big"], state["big"])
