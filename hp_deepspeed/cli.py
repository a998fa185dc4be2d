"""``hp-deepspeed``: the command line.

    hp-deepspeed validate --config configs/demo.yaml training.steps=20     # no ranks, no model
    deepspeed --num_gpus 8 -m hp_deepspeed.cli train --config run.yaml --resume auto
    hp-deepspeed eval    --config run.yaml --checkpoint auto
    hp-deepspeed export  --run-dir runs/x --out exports/x [--checkpoint step-2000]
    hp-deepspeed predict --export exports/x --task glue/rte --input rows.jsonl
    hp-deepspeed plan    --preset google/t5-v1_1-xxl --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80
    hp-deepspeed report  runs/x
    hp-deepspeed convert-universal runs/x/checkpoints/step-2000

Configs are YAML files merged in order, then ``dotted.key=value`` overrides; unknown keys and
wrong types are rejected here, before any distributed start-up or model construction.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
import warnings

from hp_deepspeed.config import load_config, one_line
from hp_deepspeed.errors import UserError
from hp_deepspeed.launching.device import prepare_process

# Subcommands that put a model on a device (and may import deepspeed).
DEVICE_COMMANDS = ("train", "eval", "export", "predict", "convert-universal")
# Subcommands whose OS errors (a full disk, a read-only folder) are one line, not a traceback.
FILE_COMMANDS = ("export", "predict", "convert-universal")


class _Parser(argparse.ArgumentParser):
    """A usage mistake gets the same single error line (exit code 2) as every other bad input,
    not argparse's usage block.

    ``arguments``: a function that adds the parser's arguments when it is first used (parsing or
    help), for a subcommand whose options need heavy imports (the planner imports torch): the
    other commands, ``--help`` and every rank's parse do without them.
    """

    def __init__(self, *args, arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending_arguments = arguments

    def _add_pending_arguments(self) -> None:
        add, self._pending_arguments = self._pending_arguments, None
        if add is not None:
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_pending_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._add_pending_arguments()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file; repeat to merge several, later ones win")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optim.lr=1e-4 data.tasks=[glue/rte,superglue/cb]")
    _add_local_rank(parser)


def _add_local_rank(parser: argparse.ArgumentParser) -> None:
    # The deepspeed launcher passes --local_rank=N (before the subcommand with --module); the
    # environment carries the same value, so it is accepted anywhere and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _job_config(args: argparse.Namespace, extra: list[str] = ()):
    from hp_deepspeed.training.train_config import JobConfig

    return load_config(JobConfig, args.config, [*args.overrides, *extra])


def _checkpoint_to_load(cfg, required: bool):
    """What ``checkpoint.resume`` names, checked from the markers alone (no ranks, no model):
    the launch scripts' preflight, ``eval`` and the trainer's resume agree through this."""
    from pathlib import Path

    from hp_deepspeed.checkpointing.layout import checkpoint_to_load

    return checkpoint_to_load(Path(cfg.run.dir) / "checkpoints", cfg.checkpoint.resume, required=required)


def _preflight(cfg, training: bool) -> None:
    """What ``validate`` checks so that the launch scripts' preflight reports it before any rank
    or node is started: the tokenizer, the tasks, the model source, the DeepSpeed config file,
    then every data split the job reads (found, decoded, parsed, counted; data/preflight.py)."""
    from hp_deepspeed.data import build_tasks, load_tokenizer
    from hp_deepspeed.data.preflight import check_splits
    from hp_deepspeed.model.builder import check_model_source
    from hp_deepspeed.training.ds_config import read_ds_config

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tasks = build_tasks(cfg.data)
    check_model_source(cfg.model)
    read_ds_config(cfg.training.ds_config)
    check_splits(cfg.data, tasks, tokenizer, training=training)


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from hp_deepspeed.config import to_dict

    # A train command line (--resume) or an eval one (--checkpoint) validates unchanged, with
    # the same checkpoint checks that command makes before it builds anything.
    evaluating = args.checkpoint is not None or args.as_command == "eval"
    spec = (args.checkpoint or "auto") if evaluating else args.resume
    cfg = _job_config(args, [f"checkpoint.resume={spec}"] if spec else [])
    _checkpoint_to_load(cfg, required=evaluating)
    _preflight(cfg, training=not evaluating)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    extra = [f"checkpoint.resume={args.resume}"] if args.resume else []
    cfg = _job_config(args, extra)
    _checkpoint_to_load(cfg, required=False)  # before DeepSpeed is imported or a rank waits for others
    from hp_deepspeed.training.trainer import Trainer

    return Trainer(cfg).train()


def cmd_eval(args: argparse.Namespace) -> int:
    from hp_deepspeed.checkpointing import CheckpointError

    cfg = _job_config(args, [f"checkpoint.resume={args.checkpoint}"])
    _checkpoint_to_load(cfg, required=True)  # before the model, the engine and metrics.jsonl exist
    from hp_deepspeed.training.trainer import Trainer

    trainer = Trainer(cfg, evaluating=True)
    if trainer.resume_from is None:
        raise CheckpointError(f"{cfg.run.dir}/checkpoints: no complete checkpoint to evaluate")
    trainer.resume()
    trainer.evaluate()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hp_deepspeed.export import export_run

    export_run(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hp_deepspeed.export import predict_main

    return predict_main(args)


def cmd_convert_universal(args: argparse.Namespace) -> int:
    # The conversion reads and rewrites every shard (tens of seconds for a small model, minutes
    # for a large one): a line before, a few during (each phase, its count every quarter), one after.
    def say(line: str) -> None:
        print(f"convert-universal: {line}", file=sys.stderr, flush=True)

    say(f"converting {args.checkpoint} to a universal checkpoint (every parameter's shards are merged)")
    started = time.monotonic()
    from hp_deepspeed.checkpointing import convert_to_universal

    out = convert_to_universal(args.checkpoint, overwrite=args.overwrite, report=say)
    say(f"converted in {time.monotonic() - started:.1f}s")
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hp-deepspeed", description=(
        "Train T5 with HyperPrompt task conditioning under DeepSpeed ZeRO, evaluate, export and predict. "
        "A train or eval run is started through a launcher: launch/local.sh, launch/torchrun.sh, "
        "launch/mpirun.sh, launch/multinode.sh or slurm/train.sbatch."))
    parser.add_argument("--log-level", default="INFO")
    _add_local_rank(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="resolve and check a config, print it; starts nothing")
    _add_config_args(p)
    # Accepted so that a train or eval command line validates unchanged (the batch scripts do).
    p.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    # The launch scripts' preflight says which command it checks (eval defaults to --checkpoint auto).
    p.add_argument("--as", dest="as_command", choices=["train", "eval"], default="train", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train (run under deepspeed, torchrun, srun or mpirun)")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint), 'none' or a path")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint of a run on its tasks")
    _add_config_args(p)
    p.add_argument("--checkpoint", default="auto", help="'auto' or a checkpoint folder")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="consolidate a checkpoint into a folder that predict and transformers (trust_remote_code) load")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="auto", help="'auto', 'best:<task>' or a step-N folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder as a whole (refused without it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="answer a task's inputs from an export, without DeepSpeed")
    p.add_argument("--export", required=True, help="folder written by hp-deepspeed export")
    p.add_argument("--task", required=True)
    p.add_argument("--input", help="jsonl/json/csv file of raw task rows; default: stdin jsonl")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-new-tokens", type=_positive_int, default=16)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert-universal", help="convert a ZeRO checkpoint for another number of ranks")
    p.add_argument("checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a step-N/universal folder left without its COMPLETE marker (refused without it)")
    p.set_defaults(func=cmd_convert_universal)

    p = sub.add_parser("plan", help="memory plan for a preset on a cluster", arguments=_plan_arguments)
    p.set_defaults(func=_run_plan)

    p = sub.add_parser("report", help="PNG plots of a run's loss and evaluations", arguments=_report_arguments)
    p.set_defaults(func=_run_report)
    return parser


# The tools' modules are imported only for their own command (the planner imports torch).
def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    from hp_deepspeed.tools import plan

    plan.add_arguments(parser)


def _run_plan(args: argparse.Namespace) -> int:
    from hp_deepspeed.tools import plan

    return plan.run(args)


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    from hp_deepspeed.tools import report

    report.add_arguments(parser)


def _run_report(args: argparse.Namespace) -> int:
    from hp_deepspeed.tools import report

    return report.run(args)


def _quiet_dependencies() -> None:
    """DeepSpeed logs every engine detail at INFO and torch warns on each deprecated collective
    call inside DeepSpeed; neither is actionable for a user, and both bury the training log."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # ZeRO-3 warns, once per rank, that it cannot see inside ConditioningOutput: by design, the
    # conditioning module owns no parameters (model/conditioning.py, rule 1), so it is noise.
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: "ConditioningOutput" not in record.getMessage())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (a file, key or value named in the message), not a bug: they are
    reported in one line instead of a traceback from every rank."""
    return (UserError, FileNotFoundError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``KEY=VALUE`` overrides may also follow options such as
    ``--resume auto`` (argparse alone takes positionals only before the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    unknown = [arg for arg in extra if arg not in late]
    if late and not hasattr(args, "overrides"):
        unknown = extra
    if unknown:
        parser.exit(2, f"hp-deepspeed {args.command}: error: unrecognized arguments: {' '.join(unknown)} "
                       f"(see hp-deepspeed {args.command} --help)\n")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def input_error_line(command: str, err: BaseException) -> str:
    """The one line a bad input gets, whatever raised it: the rule of every subcommand."""
    return f"hp-deepspeed {command}: error: {one_line(str(err))}"


def _several_ranks() -> bool:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) > 1
    return False


def print_once(line: str) -> None:
    """Print an error line to stderr once per job and node, not once per rank: every rank of a job
    usually meets the same bad input, and eight copies of one line read as eight problems. The
    first rank to claim a marker file (keyed by the launcher's pid, which the ranks of one node
    share, and the line) prints; a line only one rank meets is printed by that rank."""
    if _several_ranks():
        key = hashlib.sha256(f"{os.getppid()}\0{line}".encode()).hexdigest()[:20]
        marker = os.path.join(tempfile.gettempdir(), f"hp-deepspeed-{os.getuid()}-{key}.printed")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            try:
                if time.time() - os.stat(marker).st_mtime < 600:  # older: a reused pid, print anew
                    return
                os.utime(marker)
            except OSError:
                pass
        except OSError:
            pass  # no writable temp dir: every rank prints
    print(line, file=sys.stderr, flush=True)


def _error_exit(status: int) -> int:
    """The exit of a rank that refused its input after the process group started.

    ``shutdown_distributed`` is for clean exits only (a peer may be inside a collective), and
    left to interpreter teardown gloo's threads can abort the process (exit -6) after the one
    error line: so such a rank flushes its output and leaves at once, without teardown.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_dependencies()
    try:
        if args.command in DEVICE_COMMANDS:
            prepare_process()  # before the subcommand imports deepspeed, which picks its device once
        status = args.func(args)
    except _input_errors() as err:
        print_once(input_error_line(args.command, err))
        return _error_exit(2)
    except KeyboardInterrupt:
        # Ctrl-C before the trainer's handlers are in place (imports, start-up) or in a command
        # without them: nothing was being trained, so there is nothing to save.
        from hp_deepspeed.training.preemption import EXIT_INTERRUPTED, first_rank_by_environment

        if first_rank_by_environment():
            print(f"hp-deepspeed {args.command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except RuntimeError as err:  # torch.distributed's errors are RuntimeErrors
        from hp_deepspeed.launching.distributed import describe_lost_peer

        lost = describe_lost_peer(err)
        if lost is None:
            raise
        print_once(f"hp-deepspeed {args.command}: error: {lost} ({str(err).splitlines()[0][:300]})")
        return 1
    except OSError as err:
        from hp_deepspeed.io_errors import EXIT_IO_ERROR, describe_os_error, resource_error

        if args.command not in FILE_COMMANDS or not resource_error(err):
            raise
        # predict writes only its answers to stdout: an error without a file name is that stream.
        where = "standard output" if args.command == "predict" else None
        print(f"hp-deepspeed {args.command}: error: {describe_os_error(err, where)}", file=sys.stderr, flush=True)
        return EXIT_IO_ERROR
    if args.command in DEVICE_COMMANDS:
        from hp_deepspeed.launching.distributed import shutdown_distributed
        from hp_deepspeed.launching.supervise import record_preempted
        from hp_deepspeed.training.preemption import EXIT_PREEMPTED

        if status == EXIT_PREEMPTED:
            # The checkpoint is written: a stop signal arriving now (a supervisor's pass reaching
            # this host after the ranks already agreed on the stop) has nothing left to stop, and
            # must not turn a finished save into a KeyboardInterrupt and exit 130.
            import signal

            for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        shutdown_distributed()
        status = record_preempted(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
