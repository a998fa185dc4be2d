"""Data pipeline: task registry, loading, tokenisation cache, mixture stream, eval sets.

Modules in dependency order: ``config`` (DataConfig), ``metrics``, ``tasks`` (registry,
build_tasks, benchmark_average), ``sources`` (files / hub), ``tokenization`` (load_tokenizer,
cached tokenised splits), ``stream`` (TrainStream), ``prefetch`` (Prefetcher: batches built in a
background thread), ``evaluation`` (EvalSet).
"""

from hp_deepspeed.data.config import BUNDLED_DATA_DIR, BUNDLED_TOKENIZER_DIR, CustomTaskConfig, DataConfig
from hp_deepspeed.data.eval_sets import EvalSet, build_eval_batches
from hp_deepspeed.data.metrics import METRICS
from hp_deepspeed.data.stream import TrainStream, mixing_rates
from hp_deepspeed.data.tasks import REGISTRY, DataError, Task, benchmark_average, build_tasks
from hp_deepspeed.data.tokenization import load_tokenizer

__all__ = [
    "BUNDLED_DATA_DIR",
    "BUNDLED_TOKENIZER_DIR",
    "CustomTaskConfig",
    "DataConfig",
    "DataError",
    "EvalSet",
    "METRICS",
    "REGISTRY",
    "Task",
    "TrainStream",
    "benchmark_average",
    "build_eval_batches",
    "build_tasks",
    "load_tokenizer",
    "mixing_rates",
]
