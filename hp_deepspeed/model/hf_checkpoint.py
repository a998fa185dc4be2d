"""Hugging Face T5 checkpoints in and out, one tensor at a time.

Loading (``load_hf_weights``) reads ``model.safetensors``, ``pytorch_model.bin`` or either of
them sharded with an index file, from a local folder or a hub id. Our parameter names are HF's,
so the mapping is the identity, except for names HF keeps as aliases of the shared embedding
(``encoder.embed_tokens.weight`` ...), which are skipped.

Under ZeRO-3 the model was built inside ``deepspeed.zero.Init`` and every rank holds only its
partition. Only global rank 0 opens the checkpoint: it validates names and shapes against the
model up front (and tells every rank the verdict, so a bad checkpoint fails on all ranks with
the same message instead of hanging them), then for each parameter in turn reads that one
tensor (``safe_open`` per tensor, or a memory-mapped ``torch.load``) into the parameter
gathered by ``GatheredParameters(modifier_rank=0)``, which re-partitions it on exit. No rank
ever holds more than one full tensor, so an 11B model loads on nodes with far less RAM than
ranks x 44 GB.

Saving (``save_hf_checkpoint``) is the mirror image: gather one parameter at a time, rank 0
appends it to the current safetensors shard and writes shards of at most ``max_shard_bytes``
plus ``model.safetensors.index.json`` when there are several, and a config.json that
transformers' ``T5ForConditionalGeneration.from_pretrained`` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from hp_deepspeed.errors import WeightsError
from hp_deepspeed.launching import collectives
from hp_deepspeed.model.hub import hub_snapshot
from hp_deepspeed.model.t5_config import PRESET_ALIASES, T5Config

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Tensors HF checkpoints may hold that have no parameter of their own here: aliases of
# ``shared.weight``, and a cross-attention bias table HF itself ignores on load.
ALIASES_OF_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
IGNORED_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# transformers' tie rule for T5 and mT5 (5.x ``_tied_weights_keys``; their configs always tie):
# these tensors are one, so a checkpoint may hold any of them (transformers 5 writes only
# ``shared.weight``). ``from_pretrained`` fills a missing one from the first present one in this
# order, and keeps two present ones apart only when their values differ.
TIED_GROUP = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Hub repositories of the preset names that are checkpoints (the tiny ones are not).
_PRESET_HUB_IDS = {name: alias for alias, name in PRESET_ALIASES.items()}


def resolve_checkpoint_dir(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id (preset names map to their hub repository)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path}: not a checkpoint folder")
    repo_id = _PRESET_HUB_IDS.get(str(name_or_path), str(name_or_path))
    if str(name_or_path).startswith("tiny-"):
        raise FileNotFoundError(f"{name_or_path}: tiny presets have no published weights")
    # Prefer safetensors; only fall back to the .bin files when the repository has none.
    folder = hub_snapshot(repo_id, ["config.json", "*.safetensors", SAFETENSORS_INDEX])
    if not any(folder.glob("*.safetensors")):
        folder = hub_snapshot(repo_id, ["config.json", "pytorch_model*.bin", BIN_INDEX])
    return folder


class CheckpointReader:
    """Random access to the tensors of a (possibly sharded) HF checkpoint folder.

    Nothing is read at construction beyond index files and safetensors headers; ``read`` returns
    one tensor. ``.bin`` files are memory-mapped (``torch.load(mmap=True)``), so their tensors
    too are paged in only when copied.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.file_of: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict[str, Tensor]] = {}
        if (self.folder / SAFETENSORS_INDEX).is_file():
            self._from_index(self.folder / SAFETENSORS_INDEX)
        elif (self.folder / SAFETENSORS_SINGLE).is_file():
            self.file_of = {name: self.folder / SAFETENSORS_SINGLE for name in self._safetensors_keys(self.folder / SAFETENSORS_SINGLE)}
        elif (self.folder / BIN_INDEX).is_file():
            self._from_index(self.folder / BIN_INDEX)
        elif (self.folder / BIN_SINGLE).is_file():
            self.file_of = {name: self.folder / BIN_SINGLE for name in self._bin(self.folder / BIN_SINGLE)}
        else:
            raise FileNotFoundError(
                f"{self.folder}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
                f"{BIN_INDEX}, {BIN_SINGLE})"
            )

    def _from_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise WeightsError(f"{index}: not a valid index file ({type(err).__name__}: {err})") from None
        for name, file_name in weight_map.items():
            file = self.folder / file_name
            if not file.is_file():
                raise FileNotFoundError(f"{index}: shard {file_name} (holding {name}) does not exist")
            self.file_of[name] = file

    @staticmethod
    def _safetensors_keys(file: Path) -> list[str]:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())

    def _bin(self, file: Path) -> dict[str, Tensor]:
        if file not in self._bin_cache:
            try:
                self._bin_cache[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise WeightsError(f"{file}: cannot be read ({err})") from None
                # Files written by torch < 1.6 (not zip) cannot be memory-mapped.
                self._bin_cache[file] = torch.load(file, map_location="cpu", weights_only=True)
        return self._bin_cache[file]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.file_of[name]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return tuple(handle.get_slice(name).get_shape())
        return tuple(self._bin(file)[name].shape)

    def read(self, name: str) -> Tensor:
        """The full tensor ``name`` (the only full tensor the loader holds at a time)."""
        file = self.file_of[name]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(name)
        return self._bin(file)[name]


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if _is_zero3(param) else tuple(param.shape)


def tensor_sources(names, reader: CheckpointReader) -> dict[str, str]:
    """Parameter name -> the checkpoint tensor it is read from: its own, or for a member of
    ``TIED_GROUP`` the first member the checkpoint holds (transformers' rule)."""
    present = [name for name in TIED_GROUP if name in reader.file_of]
    sources = {}
    for name in names:
        if name in reader.file_of:
            sources[name] = name
        elif name in TIED_GROUP and present:
            sources[name] = present[0]
    return sources


def _separate_head(reader: CheckpointReader) -> bool:
    """Whether the checkpoint's lm_head differs from its embedding (transformers then unties them)."""
    if not {"shared.weight", "lm_head.weight"} <= set(reader.file_of):
        return False
    return not torch.equal(reader.read("shared.weight"), reader.read("lm_head.weight"))


def check_checkpoint(model: nn.Module, reader: CheckpointReader, tied: bool) -> str | None:
    """None when the checkpoint's names and shapes fit the model, else the error message."""
    expected = {name: _full_shape(p) for name, p in model.named_parameters()}
    skip = set(ALIASES_OF_SHARED) | set(IGNORED_TENSORS) | ({"lm_head.weight"} if tied else set())
    sources = tensor_sources(expected, reader)
    missing = [name for name in expected if name not in sources]
    if missing:
        return (
            f"checkpoint {reader.folder} lacks tensor {missing[0]} (expected shape {list(expected[missing[0]])})"
            + (f" and {len(missing) - 1} more: {', '.join(missing[1:6])}" if len(missing) > 1 else "")
        )
    unexpected = [name for name in reader.file_of if name not in expected and name not in skip]
    if unexpected:
        name = unexpected[0]
        return (
            f"{reader.file_of[name]}: unexpected tensor {name} (shape {list(reader.shape(name))}) has no "
            f"parameter in the model" + (f"; {len(unexpected) - 1} more: {', '.join(unexpected[1:6])}" if len(unexpected) > 1 else "")
        )
    for name, shape in expected.items():
        found = reader.shape(sources[name])
        if found != shape:
            return f"{reader.file_of[sources[name]]}: tensor {sources[name]} has shape {list(found)}, the model expects {list(shape)}"
    if tied and _separate_head(reader):
        return (f"{reader.file_of['lm_head.weight']}: lm_head.weight differs from shared.weight, so transformers "
                f"keeps a separate output head, but config.json ties them (tie_word_embeddings / "
                f"scale_decoder_outputs); this model cannot hold both: fix config.json")
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def load_hf_weights(model: nn.Module, name_or_path: str | Path, zero3: bool) -> None:
    """Copy a HF T5 checkpoint into ``model`` (a ``T5Model``), streaming under ZeRO-3.

    ``zero3`` says whether the model was built inside ``deepspeed.zero.Init``; it must agree
    with the parameters (checked, because a mismatch would either OOM or silently load nothing).
    Every rank must call this under ZeRO-3; only rank 0 touches the files.
    """
    params = dict(model.named_parameters())
    partitioned = any(_is_zero3(p) for p in params.values())
    if partitioned != zero3:
        raise ValueError(
            f"load_hf_weights(zero3={zero3}) but the model's parameters are "
            f"{'ZeRO-3 partitioned' if partitioned else 'not partitioned'}"
        )
    tied = bool(getattr(model, "config", None) and model.config.tie_word_embeddings)
    reads_files = not zero3 or _rank() == 0
    reader, error = None, None
    if reads_files:
        try:
            reader = CheckpointReader(resolve_checkpoint_dir(name_or_path))
            error = check_checkpoint(model, reader, tied)
        except (FileNotFoundError, WeightsError) as err:
            error = f"{type(err).__name__}: {err}"
    if zero3:
        error = collectives.broadcast_object(error, src=0)
    if error is not None:
        raise WeightsError(error)

    sources = tensor_sources(params, reader) if reader is not None else {}
    if not zero3:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(reader.read(sources[name]))
        return

    import deepspeed

    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if reader is not None:
                with torch.no_grad():
                    param.data.copy_(reader.read(sources[name]))


def save_hf_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` as a HF checkpoint folder (config.json + safetensors [+ index]).

    Call on every rank: ZeRO-3 parameters are gathered one at a time (a collective); rank 0
    writes. ``dtype`` converts on the way out (e.g. ``torch.bfloat16`` to halve the files).
    """
    out_dir = Path(out_dir)
    is_writer = _rank() == 0
    if is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / SAFETENSORS_INDEX]:
            stale.unlink(missing_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    shard_bytes = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard_bytes
        part = out_dir / f".partial-{len(written):05d}.safetensors"
        save_file(shards[0], str(part), metadata={"format": "pt"})
        written.append((part, list(shards[0])))
        shards[0], shard_bytes = {}, 0

    for name, param in model.named_parameters():
        gather = contextlib.nullcontext()
        if _is_zero3(param):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param])
        with gather:
            if is_writer:
                tensor = param.detach().to("cpu", dtype or param.dtype).contiguous().clone()
                size = tensor.numel() * tensor.element_size()
                if shard_bytes and shard_bytes + size > max_shard_bytes:
                    flush()
                shards[0][name] = tensor
                shard_bytes += size
                total += size
    if is_writer:
        flush()
        if len(written) == 1:
            os.replace(written[0][0], out_dir / SAFETENSORS_SINGLE)
        else:
            weight_map = {}
            for i, (part, names) in enumerate(written):
                final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                os.replace(part, out_dir / final)
                weight_map.update({n: final for n in names})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        config: T5Config = model.config
        hf_config = config.to_hf_dict()
        if dtype is not None:
            hf_config["dtype"] = str(dtype).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    collectives.barrier()
