# Sourced by the launch scripts with their arguments: for `train` and `eval` of the trainer,
# resolve and check the config once, in this process, so that a typo'd key or a wrong type is
# reported before any rank (or any remote node) is started.
if [ "${HP_MODULE:-hp_deepspeed.cli}" = hp_deepspeed.cli ] && { [ "${1:-}" = train ] || [ "${1:-}" = eval ]; }; then
  "${PYTHON:-python}" -m hp_deepspeed.cli validate "${@:2}" > /dev/null || exit 2
fi
