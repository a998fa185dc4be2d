#!/usr/bin/env bash
# Mutation testing of one module against its own fast tests, with mutmut 3 (pip install mutmut==3.8.1).
#
#   tests/mutation/run.sh hp_deepspeed/data/stream.py tests/data/test_stream.py [more test files]
#
# mutmut reads its settings from setup.cfg and mutates whole folders; so that the repository's
# setup.cfg stays untouched, the run happens in a copy of the working tree (under
# ${MUTATION_DIR:-/tmp/hp-mutation}/<module>), whose setup.cfg gets a [mutmut] section that
# mutates only MODULE (only_mutate; the rest of the package is copied as is). Prints mutmut's per-mutant results
# and the kill rate; `mutmut show <name>` in the copy shows a mutant's diff.
# mutmut runs as `${PYTHON:-python} -m mutmut` (no dependence on its console script).
set -euo pipefail
module=$1; shift
[ $# -ge 1 ] || { echo "usage: $0 MODULE.py TEST_FILE..." >&2; exit 2; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${MUTATION_DIR:-/tmp/hp-mutation}/$(echo "$module" | tr / _)
rm -rf "$work" && mkdir -p "$work"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work")
cd "$work"
{
  echo; echo "[mutmut]"
  echo "source_paths=hp_deepspeed/"
  echo "only_mutate=$module"
  echo "use_git_change_detection=false"
  echo "also_copy="
  for d in bench configs ds_configs; do [ -e "$d" ] && echo "    $d/"; done
  echo "pytest_add_cli_args_test_selection="
  for t in "$@"; do echo "    $t"; done
} >> setup.cfg
export PYTHONPATH=$work HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
nice -n 5 "${PYTHON:-python}" -m mutmut run --max-children 1 >mutmut.log 2>&1 || { tail -40 mutmut.log; exit 1; }
"${PYTHON:-python}" -m mutmut results --all true > results.txt || true
python - "$module" <<'PY'
import collections, re, sys
rows = [l.strip() for l in open("results.txt") if ":" in l]
status = collections.Counter(l.rsplit(":", 1)[1].strip() for l in rows)
killed = status.get("killed", 0) + status.get("timeout", 0)  # a timeout is a detected mutant too
total = sum(status.values())
print(f"{sys.argv[1]}: {total} mutants, {dict(status)}; killed (incl. timeouts) {killed}/{total} = {100 * killed / max(total, 1):.1f}%")
PY
