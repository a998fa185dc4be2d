"""The trainer: a DeepSpeed engine, a multi-task data stream, evaluation and checkpoints.

``Trainer(cfg).train()`` is the whole job. Construction does every cheap validation first
(config, tokenizer, tasks, DeepSpeed config, checkpoint to resume) and only then builds the
model, so a typo fails in seconds rather than after an 11B model has been loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from hp_deepspeed.checkpointing import CheckpointError, CheckpointManager
from hp_deepspeed.compat.deepspeed import quiet_shm_op_message
from hp_deepspeed.config import ConfigError, save_config, to_dict
from hp_deepspeed.data import TrainStream, build_tasks, load_tokenizer
from hp_deepspeed.data.prefetch import Prefetcher
from hp_deepspeed.data.shared_pools import POOL_DIR, directory_is_shared, share_pools
from hp_deepspeed.data.sources import find_split_file
from hp_deepspeed.launching import collectives
from hp_deepspeed.launching.distributed import init_distributed
from hp_deepspeed.model.builder import resolve_t5_config
from hp_deepspeed.model.conditioning import PER_EXAMPLE_VARIANTS
from hp_deepspeed.model.hyperprompt_t5 import build_model
from hp_deepspeed.training.ds_config import build_ds_config, read_ds_config
from hp_deepspeed.training.evaluation import Evaluator
from hp_deepspeed.training.flops import device_peak_tflops, shape_of, train_step_flops
from hp_deepspeed.training.metrics_log import MetricsLog, memory_stats
from hp_deepspeed.training.nonfinite import EXIT_NON_FINITE, NonFiniteGuard, NonFiniteLoss
from hp_deepspeed.training.optim import build_scheduler
from hp_deepspeed.training.parallelism import ModelSize, mark_leaf_blocks
from hp_deepspeed.training.preemption import EXIT_PREEMPTED, PreemptionHandler
from hp_deepspeed.training.run_lock import claim_run_dir
from hp_deepspeed.training.train_config import JobConfig

log = logging.getLogger(__name__)
# The batch entries that say which task each example is: ``task_ids`` [B], or for packed rows
# (``data.packing``) the segment ids and each segment's task.
_TASK_KEYS = ("task_ids", "input_segment_ids", "target_segment_ids", "segment_task_ids")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_vocabulary(tokenizer, t5_config, where: str) -> None:
    """Token ids past the embedding table would crash deep inside the first forward."""
    if len(tokenizer) > t5_config.vocab_size:
        raise ConfigError(
            f"model.name_or_path={where}: vocab_size {t5_config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens; use a matching tokenizer (data.tokenizer) or model config"
        )


class WindowStats:
    """Sums over the steps since the last log record, all-reduced when the record is written.

    The sums stay on the device until then: a ``.cpu()`` or ``int()`` per micro-batch would wait
    for the GPU to finish the step (a host-device sync) and stall the next step's launch.
    """

    def __init__(self, num_tasks: int, device: torch.device = torch.device("cpu")):
        self.num_tasks = num_tasks
        self.device = device
        self.reset()

    def reset(self) -> None:
        # task loss sums, task token counts, then the input + target token count
        self.sums = torch.zeros(2 * self.num_tasks + 1, dtype=torch.float64, device=self.device)
        self.samples = 0
        self.flops = 0.0
        self.steps = 0
        self.data_wait_s = 0.0  # host time the steps spent waiting for their batches
        self.started = time.perf_counter()

    def add_micro_batch(self, batch: dict, out) -> None:
        n = self.num_tasks
        if "segment_task_ids" in batch:  # packed rows: the model's outputs are per segment
            task_ids = batch["segment_task_ids"].to(self.device).flatten()
            present = task_ids >= 0
            # An empty slot's sums are zero: adding them to task 0 changes nothing.
            task_ids = task_ids.clamp(min=0)
            self.samples = self.samples + present.sum()
        else:
            task_ids = batch["task_ids"].to(self.device)
            self.samples += task_ids.numel()
        self.sums[:n].index_add_(0, task_ids, out.example_loss_sum.detach().double())
        self.sums[n:2 * n].index_add_(0, task_ids, out.example_token_count.detach().double())
        self.sums[2 * n] += batch["attention_mask"].sum() + (batch["labels"] != -100).sum()

    def reduce(self) -> dict[str, torch.Tensor]:
        """Sum across ranks; one collective for everything, one copy to the host."""
        n = self.num_tasks
        samples = torch.as_tensor(self.samples, dtype=torch.float64, device=self.device).reshape(1)
        flat = torch.cat([
            self.sums[:2 * n], samples,
            self.sums[2 * n:], torch.tensor([self.flops], dtype=torch.float64, device=self.device),
        ])
        flat = collectives.all_reduce(flat).cpu()
        return {"task_loss": flat[:n], "task_tokens": flat[n:2 * n], "samples": flat[2 * n],
                "tokens": flat[2 * n + 1], "flops": flat[2 * n + 2]}


@contextlib.contextmanager
def progress_bar(total: int, initial: int, shown: bool):
    """The training progress bar on stderr, and one owner of the terminal while it is drawn: log
    lines go through ``tqdm.write``, which clears the bar, prints the line whole and redraws the
    bar below it, so no log line starts in the middle of a bar line. ``shown=False``: a disabled
    bar (its updates cost nothing) and logging untouched."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, disable=not shown, desc="train", dynamic_ncols=True)
    try:
        with logging_redirect_tqdm() if shown else contextlib.nullcontext():
            yield bar
    finally:
        bar.close()


class Trainer:
    def __init__(self, cfg: JobConfig, evaluating: bool = False):
        """``evaluating``: built by the ``eval`` command (its metrics are a series of their own)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        # Handlers first: a preemption signal that arrives while an 11B model is being loaded
        # must become a save at the first step boundary, not kill the rank.
        self.preemption = PreemptionHandler(cfg.preemption).install()
        # Cheap checks first: everything that can fail on bad input fails before the process
        # group, the data or the model exist.
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.tasks = build_tasks(cfg.data)
        self.t5_config = resolve_t5_config(cfg.model)
        check_vocabulary(self.tokenizer, self.t5_config, cfg.model.name_or_path)
        base_ds_config = read_ds_config(cfg.training.ds_config)

        quiet_shm_op_message()
        self.dist_env = init_distributed()
        self.rank, self.world_size = self.dist_env.rank, self.dist_env.world_size
        self.is_main = self.rank == 0
        self.preemption.speaks = self.is_main
        if self.is_main:
            import psutil

            log.info("process group of %d rank(s) up, %.1fs after this rank started (imports, data checks, rendezvous)",
                     self.world_size, time.time() - psutil.Process().create_time())
        if not self.is_main:
            # Every rank runs the same code: its info lines would repeat rank 0's.
            # Warnings and errors still come from every rank.
            logging.getLogger("hp_deepspeed").setLevel(logging.WARNING)
        # One trainer per run dir, writable by every rank: refused before anything is written or built.
        self.run_lock = claim_run_dir(self.run_dir, self.rank)
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        self.on_cpu = self.device.type == "cpu"
        seed_everything(cfg.run.seed)
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, model_config=self.architecture(),
                                             data_files=self.training_files())
        self.resume_from = self.checkpoints.find_resume_point(cfg.checkpoint.resume)
        self.ds_config = build_ds_config(
            base_ds_config,
            micro_batch_size=cfg.training.micro_batch_size,
            gradient_accumulation=cfg.training.gradient_accumulation,
            world_size=self.world_size, optim=cfg.optim, d_model=self.t5_config.d_model,
            log_every=cfg.training.log_every, on_cpu=self.on_cpu,
            model_size=ModelSize.of(cfg.model, cfg.conditioning, len(self.tasks)),
        )
        if self.is_main:
            log.info("%s", self.start_line())
        phase = time.perf_counter()
        self.stream = TrainStream(
            cfg.data, self.tasks, self.tokenizer, micro_batch_size=cfg.training.micro_batch_size,
            rank=self.rank, world_size=self.world_size, seed=cfg.run.seed,
            accumulation=cfg.training.gradient_accumulation,  # the stream's batch is the step's
            segment_conditioning=cfg.conditioning.variant not in PER_EXAMPLE_VARIANTS,
            pool_dir=None if evaluating else self.pool_dir(),  # the eval command draws no batch
        )

        if self.is_main:  # each start-up phase that can take seconds says what it did
            log.info("data: %d training examples in %d task(s), %s, ready in %.1fs",
                     sum(self.stream.sizes), len(self.stream.tasks),
                     "packed rows" if self.stream.packing else "one row per example", time.perf_counter() - phase)
        phase = time.perf_counter()
        # The expensive part: build (and stream in) the sharded model, then the engine.
        self.model = build_model(cfg.model, cfg.conditioning, num_tasks=len(self.tasks), ds_config=self.ds_config)
        self.model_shape = shape_of(self.t5_config)
        mark_leaf_blocks(self.model, self.ds_config, cfg.training.zero3_leaf_blocks)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=trainable, config=self.ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.training.steps),
        )
        if self.is_main:
            log.info("model and DeepSpeed engine ready in %.1fs", time.perf_counter() - phase)
        self.evaluator = Evaluator(cfg.eval, cfg.data, self.tasks, self.tokenizer, self.rank, self.world_size)
        self.metrics = MetricsLog(
            self.run_dir, enabled=self.is_main, tensorboard=cfg.training.tensorboard, evaluating=evaluating,
            start_step=self.resume_from.step if self.resume_from is not None else 0)
        self.peak_tflops = device_peak_tflops()
        self.step = 0
        self.nonfinite = NonFiniteGuard(cfg.training.max_nonfinite_steps, verbose=self.is_main)

    def pool_dir(self) -> Path | None:
        """Where the ranks share the training stream's pools (``data.share_pools``), or None:
        the run dir's ``data_pools`` when there are several ranks and every rank sees that
        directory (one collective check, every rank calls it)."""
        setting, pools = self.cfg.data.share_pools, self.run_dir / POOL_DIR
        shared = None
        if setting == "auto" and self.world_size > 1:
            shared = directory_is_shared(pools, self.rank, collectives.broadcast_object,
                                         lambda seen: collectives.all_reduce_flag(seen, "min"))
            if not shared and self.is_main:
                log.warning("data.share_pools: %s is not the same directory on every rank, so every rank builds "
                            "every data pool itself (a cost per step that grows with the world size)", pools)
        if not share_pools(setting, self.world_size, shared):
            return None
        if self.is_main:
            log.info("data: each pool of global batches is built by one rank and shared in %s", pools)
        return pools

    def start_line(self) -> str:
        """What runs, in one line: ranks, devices, ZeRO stage, precision, where checkpoints go."""
        ds = self.ds_config
        precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
        if self.on_cpu:
            devices = f"CPU, {torch.get_num_threads()} threads per rank"
        else:
            devices = f"{self.device.type} ({torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else self.device})"
        return (f"training on {self.world_size} rank(s), {devices}; ZeRO stage {ds['zero_optimization'].get('stage', 0)} "
                f"({self.cfg.training.ds_config}); {precision}; checkpoints in {self.run_dir / 'checkpoints'}")

    def architecture(self) -> dict:
        """What a checkpoint must match to be loaded into this job (dropout and the like may differ)."""
        t5 = {k: v for k, v in dataclasses.asdict(self.t5_config).items() if k != "dropout_rate"}
        return {"t5": t5, "conditioning": to_dict(self.cfg.conditioning), "tasks": [t.name for t in self.tasks]}

    def training_files(self) -> dict[str, Path]:
        """Each task's local training file: a checkpoint records them, a resume refuses them changed."""
        files = {}
        for task in self.tasks:
            path = find_split_file(task, task.train_split) if task.train_split is not None else None
            if path is not None and path.is_file():
                files[task.name] = path
        return files

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Train to ``training.steps``; returns the process exit code (75 after a preemption save,
        65 when non-finite numbers stopped it)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")  # the resolved config of this run
        self.resume()
        cfg = self.cfg.training
        window = WindowStats(len(self.tasks), self.device)
        depth = self.cfg.data.prefetch_batches
        # A checkpoint holds the position of the model's next batch, not the producer's.
        self.batches = Prefetcher(self.stream, self.device, depth) if depth else iter(self.stream)
        batches = self.batches
        # No bar when stderr is a file or a pipe (a batch log, a launcher relaying lines): there
        # its carriage returns only interleave with the log lines.
        shown = self.is_main and self.cfg.training.progress_bar and sys.stderr.isatty()
        terminal = contextlib.ExitStack()
        progress = terminal.enter_context(progress_bar(self.cfg.training.steps, self.step, shown))
        try:
            while self.step < cfg.steps:
                loss_sum = self.train_step(batches, window)
                self.step += 1
                progress.update(1)
                last = self.step == cfg.steps
                # Device work only; read at the check points below, before any eval or save.
                self.nonfinite.observe(self.step, loss_sum, self.engine.get_global_grad_norm(),
                                       self.engine.was_step_applied())
                logging_step = self.step % cfg.log_every == 0 or last
                save = last or self.checkpoints.due(self.step)
                evaluate = last or (self.cfg.eval.every and self.step % self.cfg.eval.every == 0)
                if (logging_step or save or evaluate) and self._stopped_non_finite(window, last):
                    return EXIT_NON_FINITE
                if logging_step:
                    self.log_train(window)
                if evaluate and self.nonfinite.finite:
                    improved = self.evaluate()
                    # The paper keeps the best checkpoint per task: a new best must be on disk.
                    save = save or (bool(improved) and self.cfg.checkpoint.keep_best)
                stop = self.preemption.should_stop(self.step)  # every rank, every step; reads the last step's flags
                if stop and self._stopped_non_finite(window, last):
                    return EXIT_NON_FINITE
                # Non-finite weights, or those of a step whose update was skipped, are never saved.
                if (save or stop) and self.nonfinite.finite:
                    # The last and a preemption save are official before the process may exit;
                    # others may finish in the background (checkpoint.async_save).
                    self.save(wait=last or stop)
                if stop:
                    if self.is_main:
                        log.warning("%s; stopping with exit code %d (resume with --resume auto)",
                                    f"checkpoint of step {self.step} written" if self.nonfinite.finite else
                                    f"step {self.step} is non-finite, so the last finite checkpoint stays latest",
                                    EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
            return 0
        finally:
            failing = sys.exc_info()[0] is not None
            self.preemption.finish(failing)
            self.finish_checkpoint(failing=failing)
            if isinstance(batches, Prefetcher):
                batches.close()
            if not failing:  # after a crash they stay: a requeue with the same stream reuses them
                self.stream.remove_pool_files()
            terminal.close()
            self.preemption.restore()
            self.metrics.close()

    def _stopped_non_finite(self, window: WindowStats, last: bool) -> bool:
        """Settle the non-finite guard (collective); on a stop, log the window and print the one line."""
        try:
            self.nonfinite.settle()
            if last and not self.nonfinite.finite:  # the final weights are not worth saving
                raise NonFiniteLoss(self.nonfinite.stop_line(self.step))
        except NonFiniteLoss as err:
            self.log_train(window)
            if self.is_main:
                print(f"hp-deepspeed train: error: {err}", file=sys.stderr, flush=True)
            return True
        return False

    def train_step(self, batches, window: WindowStats) -> None:
        """One optimizer step over ``gradient_accumulation`` micro-batches per rank.

        The objective is the mean token loss over the whole global batch, however it is split
        across ranks and micro-batches: each micro-batch contributes its summed token loss divided
        by the global batch's token count. DeepSpeed averages gradients over ranks and scales the
        loss by 1/accumulation in ``backward``; the factor ``world x accumulation`` undoes both.
        Without this a rank holding short targets would weigh its tokens more, and a run resumed
        on a different number of ranks would follow a different trajectory.
        Returns this rank's summed token loss of the step, on the device (for the non-finite check).
        """
        accumulation = self.cfg.training.gradient_accumulation
        waited = time.perf_counter()
        micro_batches = [{k: v.to(self.device) for k, v in next(batches).items()} for _ in range(accumulation)]
        window.data_wait_s += time.perf_counter() - waited
        window.steps += 1
        # Counted on the device: an int() or .item() here would wait for the previous step.
        tokens = collectives.all_reduce(
            torch.stack([(b["labels"] != -100).sum() for b in micro_batches]).sum().reshape(1).double())
        scale = (self.world_size * accumulation / tokens.clamp(min=1.0))[0]
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"], **{k: batch[k] for k in _TASK_KEYS if k in batch})
            loss_sum = loss_sum + out.example_loss_sum.detach().float().sum()
            self.engine.backward(out.example_loss_sum.sum() * scale.to(out.example_loss_sum.dtype))
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            window.add_micro_batch(batch, out)
            # prompt_tuning's soft tokens lengthen the encoder input; a packed row holds the
            # key/value prompts of each of its segment slots
            prompt_slots = batch["segment_task_ids"].shape[1] if "segment_task_ids" in batch else 1
            window.flops += train_step_flops(
                self.model_shape, batch["input_ids"].shape[0],
                batch["input_ids"].shape[1] + self.cfg.conditioning.input_prompt_length,
                batch["labels"].shape[1], self.model.kv_prompt_length * prompt_slots,
            )
        return loss_sum

    # ------------------------------------------------------------------ logging
    def log_train(self, window: WindowStats) -> None:
        totals = window.reduce()
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        tokens = totals["task_tokens"].sum().item()
        values = {
            "loss": totals["task_loss"].sum().item() / max(tokens, 1.0),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": totals["samples"].item() / elapsed,
            "tokens_per_s": totals["tokens"].item() / elapsed,
            "tflops_per_gpu": totals["flops"].item() / elapsed / self.world_size / 1e12,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        # The step counts global batches; these are the ones (since this process started) whose
        # update DeepSpeed skipped.
        values["skipped_updates"] = self.nonfinite.skipped_updates
        if self.peak_tflops:
            values["mfu"] = values["tflops_per_gpu"] / self.peak_tflops
        for task in self.tasks:
            count = totals["task_tokens"][task.task_id].item()
            if count:
                values[f"loss/{task.name}"] = totals["task_loss"][task.task_id].item() / count
        # Per step, on rank 0: the data time the host still adds to the step.
        values["data_wait_ms"] = 1e3 * window.data_wait_s / max(window.steps, 1)
        values.update(memory_stats())
        self.metrics.write("train", self.step, values)
        if self.is_main:
            log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        window.reset()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[str]:
        """Evaluate every task; returns the eval sets whose best score this step improved."""
        self.engine.eval()
        try:
            scores = self.evaluator.evaluate(self.engine.module, self.step)
        finally:
            self.engine.train()
        self.metrics.write("eval", self.step, scores)
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(self.evaluator.format_table(scores, self.step))  # a plain print when no bar is drawn
        return self.checkpoints.record_eval(self.step, self.evaluator.primary_scores(scores))

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        batches = getattr(self, "batches", None)
        position = batches if isinstance(batches, Prefetcher) else self.stream
        return {"step": self.step, "data": position.state_dict()}

    def save(self, wait: bool = True) -> None:
        self.checkpoints.save(self.engine, self.step, self.trainer_state(), to_dict(self.cfg), wait=wait)

    def finish_checkpoint(self, failing: bool) -> None:
        """On every way out of the loop: a save still in the background completes first. Its
        failure is raised, unless the loop is already ending on an error (then it is logged)."""
        try:
            self.checkpoints.wait()
        except CheckpointError as err:
            if not failing:
                raise
            log.error("%s", err)

    def resume(self) -> None:
        if self.resume_from is None:
            return
        point, self.resume_from = self.resume_from, None  # a ZeRO-3 engine loads only once, pristine
        state = self.checkpoints.load(self.engine, point)
        self.step = state["step"]
        try:
            self.stream.load_state_dict(state["data"])
        except ValueError as err:
            if not self.cfg.checkpoint.accept_changed_data:
                raise
            # The old position means nothing in changed files: the stream starts over on them
            # (the same on every rank, so the ranks still draw one global batch together).
            if self.is_main:
                log.warning("the data stream starts over on the changed training data (%s)", err)
        if self.is_main:
            log.info("resumed from %s at step %d", point.path, self.step)
