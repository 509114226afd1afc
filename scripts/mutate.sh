#!/usr/bin/env bash
# Mutation testing of one recam_jax module with mutmut (docs/testing.md).
#
#   scripts/mutate.sh flow                                    # the module's default tests (below)
#   scripts/mutate.sh convert tests/test_convert.py -k infer  # other tests / pytest options
#   MUTANTS='recam_jax.convert.x_infer_config__mutmut_*' scripts/mutate.sh convert  # some functions
#   KEEP=1 MUTANTS='recam_jax.flow.x__bump__mutmut_5' scripts/mutate.sh flow        # rerun survivors
#
# mutmut reads its config from the working directory and copies the project into mutants/, so the
# run happens in a scratch project, build/mutmut/MODULE/ (git-ignored), made fresh every time:
# every figure comes from a clean run. Each mutant runs the tests that reach the mutated function,
# in one process (-n 0: no xdist workers), stopping at the first failure. The last line is the
# module's row of the table in docs/testing.md; `cd build/mutmut/MODULE && mutmut show NAME`
# prints a survivor's diff.
set -euo pipefail

module=${1:?usage: scripts/mutate.sh MODULE [PYTEST_ARGS...], e.g. scripts/mutate.sh flow}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -f "$repo/recam_jax/$module.py" ]] || { echo "no module recam_jax/$module.py" >&2; exit 2; }

# The tests that cover each module and run in seconds (the slow mesh-parity tests are left out).
if (($# == 0)); then
  case $module in
    flow) set -- tests/test_flow.py ;;
    optim) set -- tests/test_optim.py ;;
    sharding) set -- tests/test_sharding.py -k "not dit_on_mesh" ;;
    checkpoint) set -- tests/test_checkpoint.py ;;
    torch_io) set -- tests/test_torch_io.py ;;
    convert) set -- tests/test_convert.py ;;
    *) echo "no default tests for $module: pass the test files after the module name" >&2; exit 2 ;;
  esac
fi

mutmut=${MUTMUT:-mutmut}  # the test extra installs it: pip install -e ".[test]"
work=$repo/build/mutmut/$module
# KEEP=1 keeps the last run's results and reruns only the mutants named in MUTANTS (with the tests
# as they are now): the way to check that a new test kills a survivor without a full run.
[[ ${KEEP:-0} == 1 && -n ${MUTANTS:-} ]] || rm -rf "$work"
mkdir -p "$work"
for path in recam_jax tests configs data_pipeline launch pytest.ini; do
  ln -sfn "$repo/$path" "$work/$path"
done
# The fixtures the tests find at ../shared, seen from mutants/.
[[ -e "$repo/../shared" ]] && ln -sfn "$(cd "$repo/../shared" && pwd)" "$work/shared"

{
  echo "[mutmut]"
  echo "source_paths = recam_jax"
  echo "only_mutate = recam_jax/$module.py"
  echo "also_copy ="
  for path in configs data_pipeline launch pytest.ini; do echo "    $path"; done
  echo "pytest_add_cli_args_test_selection ="
  for arg in "$@"; do echo "    $arg"; done
  echo "pytest_add_cli_args = -n 0"
  echo "use_git_change_detection = false"
  # Fork mutant runs from a process that has imported the tests but never started XLA: forking a
  # process whose XLA runtime threads are running deadlocks the child.
  echo "process_isolation = forkserver"
} >"$work/setup.cfg"

cd "$work"
# shellcheck disable=SC2086  # MUTANTS is a list of globs
nice -n 10 "$mutmut" run --max-children "${MUTMUT_CHILDREN:-1}" ${MUTANTS:-} | tr '\r' '\n' | LC_ALL=C grep -av $'^\xe2[\xa0-\xa3]' || true  # without the spinner lines
echo "not killed:"
"$mutmut" results
python - "$module" <<'PY'
"""The module's row: mutants made, run, killed (a test failed or timed out), not killed, score."""
import collections, datetime, json, sys

from mutmut.stats import status_by_exit_code

module = sys.argv[1]
with open(f"mutants/recam_jax/{module}.py.meta") as f:
    codes = list(json.load(f)["exit_code_by_key"].values())
status = collections.Counter(status_by_exit_code[c] for c in codes if c is not None)
killed = status["killed"] + status["timeout"]
tested = sum(status.values())
print(dict(status))
print(f"| {module}.py | {len(codes)} | {tested} | {killed} | {tested - killed} | {killed / max(tested, 1):.1%} | "
      f"{datetime.date.today()} |")
PY
