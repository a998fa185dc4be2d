# Sourced by the launch scripts with their arguments.
#
# For `train` and `eval` of the trainer, resolve and check the config once, in this process, so
# that a typo'd key or a wrong type is reported before any rank (or any remote node) is started.
if [ "${HP_MODULE:-hp_deepspeed.cli}" = hp_deepspeed.cli ] && { [ "${1:-}" = train ] || [ "${1:-}" = eval ]; }; then
  # `--as`: an eval command line needs a checkpoint even without --checkpoint (its default is auto).
  # The one error line goes to stderr; KEY=VALUE overrides may follow --resume/--checkpoint.
  "${PYTHON:-python}" -m hp_deepspeed.cli validate --as "$1" "${@:2}" > /dev/null || exit 2
fi

# A CPU run on a GPU host (HP_DEVICE=cpu or HP_DIST_BACKEND=gloo) is a CPU run for DeepSpeed
# too, its launcher included: DeepSpeed picks its accelerator when first imported (see
# hp_deepspeed/launching/device.py, which the ranks apply again).
case "${HP_DEVICE:-}:${HP_DIST_BACKEND:-}" in
  [cC][pP][uU]:* | *:gloo) export DS_ACCELERATOR=cpu ;;
esac

# openmpi_binding OPTIONS: the binding option to add to Open MPI's mpirun given OPTIONS.
# Open MPI binds each rank to one core when it starts two ranks or fewer (to a package
# beyond), which leaves a rank's intra-op, data-loader and communication threads a single
# core to share: a 3-step CPU run here took 110 s bound and 13 s unbound. The deepspeed
# launcher and torchrun do not bind, so neither do we unless OPTIONS choose a binding.
openmpi_binding() {
  case " $1 " in
    *" --bind-to "* | *" -bind-to "* | *" --bind-to="*) ;;
    *) echo "--bind-to none" ;;
  esac
}

# Signals: the launch scripts run their launcher under hp_deepspeed.launching.supervise, so that
# SIGINT (Ctrl-C), SIGTERM or SIGUSR1 to the script reaches every rank of this node as "save a
# checkpoint at the next step and stop" (exit 75, resume with --resume auto); a second SIGINT or
# SIGTERM stops everything at once without saving (130 / 143). HP_STOP_TIMEOUT (seconds,
# default 300) bounds the wait for the save before the ranks are killed.
