"""Configuration of the data pipeline: which tasks, where their files are, how they are mixed.

``DataConfig`` is the ``data:`` section of a run config; it is validated by
``hp_deepspeed.config.from_dict`` like every other section, so an unknown key or a wrong type
fails before anything is loaded. ``CustomTaskConfig`` describes one user-defined task.

    data:
      tasks: [glue/rte, superglue/cb, synthetic/copy]
      custom_tasks:
        - name: my/sentiment
          path: /data/sentiment            # train.jsonl, validation.jsonl ...
          input_template: "classify: {text}"
          label_words: [negative, positive]
          metrics: [accuracy, f1]
      mixture: proportional
      mixture_cap: 65536
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The folders shipped inside the package (made by scripts/make_bundled_data.py and
# scripts/train_tokenizer.py), so the demo and the tests need no network.
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
BUNDLED_DATA_DIR = BUNDLED_DIR / "data"
BUNDLED_TOKENIZER_DIR = BUNDLED_DIR / "tokenizer"


@dataclass
class CustomTaskConfig:
    """A task defined in the config rather than in the registry of ``hp_deepspeed.data.tasks``."""

    name: str
    """Unique task name (must not collide with a registry name), e.g. ``my/sentiment``."""

    input_template: str
    """``str.format`` template over the row's fields giving the model input, e.g.
    ``"classify: {text}"``. A row lacking a field named here is a malformed row."""

    path: str | None = None
    """Folder holding one file per split named ``<split>.<jsonl|json|csv|parquet>``, or (with
    ``DataConfig.hub``) a hub dataset id. Either this or ``data_files`` is required."""

    hub_config: str | None = None
    """Hub dataset configuration name (the second argument of ``load_dataset``), if any."""

    data_files: dict[str, str] = field(default_factory=dict)
    """Explicit split -> file mapping; takes precedence over files found under ``path``."""

    target_field: str | None = None
    """Field holding the target text (generation tasks). Exactly one of this and
    ``label_words`` must be set."""

    label_field: str = "label"
    """Field holding the class label, as an index into ``label_words`` or as the word itself."""

    label_words: list[str] | None = None
    """Label index -> target word, for classification tasks (also used for rank scoring)."""

    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    """Metric names from ``hp_deepspeed.data.metrics.METRICS``: with ``label_words`` any of
    accuracy, f1 (binary), macro_f1, matthews_corrcoef; with ``target_field`` accuracy (exact
    match) or pearson/spearman, which make it a regression task (targets and predictions are
    parsed as floats)."""

    train_split: str | None = "train"
    """Split used for training; ``null`` makes the task evaluation-only."""

    eval_splits: list[str] = field(default_factory=lambda: ["validation"])
    """Splits evaluated (each gives its own metrics)."""


@dataclass
class DataConfig:
    """Tasks, files, tokenisation, mixture sampling and batching of a multi-task run."""

    tasks: list[str] = field(default_factory=list)
    """Registry task names in task-id order, e.g. ``[glue/rte, superglue/rte, synthetic/copy]``
    (GLUE and SuperGLUE both have an "rte": they are ``glue/rte`` and ``superglue/rte``)."""

    custom_tasks: list[CustomTaskConfig] = field(default_factory=list)
    """User-defined tasks; they get the task ids after those of ``tasks``."""

    data_dir: str | None = None
    """Folder with ``<task name>/<split>.<ext>`` files for registry tasks
    (e.g. ``glue/rte/train.jsonl``); ``null`` means the bundled demo data."""

    hub: bool = False
    """Load registry tasks whose files are not under ``data_dir`` from the Hugging Face hub
    (``nyu-mll/glue``, ``aps/super_glue``). Needs network; never tried when
    ``HF_DATASETS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` is set."""

    tokenizer: str | None = None
    """Folder of a transformers tokenizer (T5's sentencepiece one, or the bundled one made by
    scripts/train_tokenizer.py); ``null`` means the bundled tokenizer."""

    max_input_length: int = 512
    """Inputs are truncated to this many tokens (EOS included)."""

    max_target_length: int = 128
    """Targets are truncated to this many tokens (EOS included)."""

    mixture: Literal["proportional", "temperature", "weights"] = "proportional"
    """How training examples are drawn across tasks: proportional to (capped) dataset size as
    in T5, proportional to capped size ** (1 / temperature), or the explicit ``weights``."""

    mixture_cap: int | None = 65536
    """Examples-proportional cap K: a task counts as min(size, K) examples (T5 section 3.5.2);
    ``null`` disables the cap. Used by ``proportional`` and ``temperature``."""

    temperature: float = 2.0
    """Mixing temperature T of ``temperature`` mixing (T=1 is proportional, large T uniform)."""

    weights: dict[str, float] = field(default_factory=dict)
    """Task name -> relative weight for ``weights`` mixing; every training task needs one."""

    bucket_pool_batches: int = 200
    """Length bucketing: this many global batches are drawn at once, sorted by length, cut
    into batches and the batches shuffled. Larger pools pad less (bench/batching.py: about 96%
    real tokens at 200 on a GLUE-like mix, 89% at 50); the cost is that resuming with another
    global batch size skips the rest of the interrupted pool. 1 disables bucketing."""

    batch_mixing: Literal["stratified", "length"] = "stratified"
    """How a pool's examples are cut into global batches. ``stratified``: every global batch
    holds each task at its mixing rate (to one example), and within a batch each rank gets a
    contiguous range of lengths, so padding stays low when a rank's micro-batch is no larger
    than a task's share of the global batch (bench/batching.py: 8 GLUE-like tasks, 16 x 8
    ranks, ~93% real tokens, largest task share 1.0x its rate). ``length``: the pool is sorted
    by length and cut, the least padding when micro-batches are large, but batches cluster by
    task (largest share 3.5x its rate on the same mix): the mixture then holds only over many
    steps. Gradient accumulation micro-steps are cut as ranks are: one GPU with 8 micro-steps of
    16 pads as little as 8 GPUs; one GPU with one micro-step per optimizer step cannot, since
    that micro-batch must hold every task."""

    packing: bool | Literal["auto"] = "auto"
    """Training only: lay each micro-batch's examples (the same draws, so the mixture and resume
    are unchanged) end to end in a few rows of balanced length, with segment-aware attention
    (each example sees only its own tokens and its task's prompts), instead of one padded row
    per example. Why: one GPU with one micro-batch per step must hold every task at its rate,
    and tasks differ ~12x in length, so unpacked it keeps ~40% real tokens, packed ~98%
    (bench/batching.py). A row is at most ``max_input_length`` / ``max_target_length``
    tokens long. Trade-off: attention runs over the whole row (masked), so its cost grows with
    the row length while the padding saved is mostly feed-forward work, and with key/value
    prompts a row carries each of its segments' prompts; worth it when micro-batches span tasks
    of very different lengths (one GPU, no accumulation), not when they already hold similar
    lengths (bench/batching.py: +71% attention cells at 8 ranks). ``auto`` (the default) packs
    exactly there: when a step is one micro-batch (world size x accumulation = 1) and the
    variant conditions segments (``resolve_packing``). ``true`` is refused for
    ``prompt_tuning``, ``hyperformer`` and ``adapter``, which condition per example, not per
    segment; ``auto`` leaves them unpacked."""

    prefetch_batches: int = 4
    """Micro-batches built, collated and copied to the device in a background thread while the
    current step runs (data/prefetch.py); 0 builds each batch inline, on the critical path. The
    checkpointed data position is the model's either way, so resume is exact."""

    share_pools: Literal["auto", "off"] = "auto"
    """Build each pool of the training stream once per job instead of once per rank: pool ``p``
    is built by rank ``p % world_size`` into ``<run.dir>/data_pools`` and the other ranks map its
    file and read only their rows (data/shared_pools.py), so a rank's data cost per step does not
    grow with the world size (bench/host_data.py, ``pool`` section). ``auto``: shared with more
    than one rank when every rank sees the same run dir (checked at start-up; if not, every rank
    builds every pool, with one warning); ``off``: every rank builds every pool. The batches are
    the same either way."""

    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row (bad JSON/CSV, missing or mistyped field) raises an error naming the file
    and line, or with ``skip`` is dropped and counted (logged, and in ``TrainStream.skipped``).
    A label outside the task's label set is always an error."""

    cache_dir: str | None = None
    """Tokenisation cache; ``null`` means ``$HP_DEEPSPEED_CACHE`` or ``~/.cache/hp_deepspeed``."""

    seed: int = 0
    """Seed of the example stream (mixture draws, per-epoch permutations, batch order)."""

    eval_splits: dict[str, list[str]] = field(default_factory=dict)
    """Per-task override of the evaluated splits, e.g. ``{glue/mnli: [validation_matched]}``."""

    task_prefix: bool = False
    """Name the task in the text of every input, as T5's multi-task model does: the inputs of the
    synthetic and custom tasks get ``"<task>: "`` (the part of the name after the last ``/``)
    in front; GLUE/SuperGLUE inputs already begin with the task's name, and a custom task whose
    ``input_template`` begins with text of its own keeps that text as its prefix. Switched on by
    ``conditioning.variant: mtl``, the paper's multi-task baseline."""

    def __post_init__(self) -> None:
        # Checked here, not where the values are used, so they fail before any rank starts.
        for name in ("max_input_length", "max_target_length", "bucket_pool_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.mixture_cap is not None and self.mixture_cap < 1:
            raise ValueError(f"data.mixture_cap must be >= 1 or null, got {self.mixture_cap}")
        if self.temperature <= 0:
            raise ValueError(f"data.temperature must be > 0, got {self.temperature}")
        negative = {task: w for task, w in self.weights.items() if w < 0}
        if negative:
            raise ValueError(f"data.weights must be >= 0, got {negative}")

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else BUNDLED_DATA_DIR

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        root = os.environ.get("HP_DEEPSPEED_CACHE") or Path.home() / ".cache" / "hp_deepspeed"
        return Path(root) / "data"


def resolve_packing(setting: bool | str, micro_batches_per_step: int, segment_conditioning: bool) -> bool:
    """Whether the training stream packs: ``data.packing`` with ``auto`` decided (see its
    docstring). ``micro_batches_per_step`` is world size x gradient accumulation;
    ``segment_conditioning`` says whether the conditioning variant works on packed segments."""
    if setting == "auto":
        return micro_batches_per_step == 1 and segment_conditioning
    return bool(setting)
