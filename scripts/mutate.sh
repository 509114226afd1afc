#!/usr/bin/env bash
# Mutation testing of one module with mutmut (scores: docs/testing.md for recam_jax/, docs/data.md
# for data_pipeline/). A bare name is a recam_jax module; data_pipeline modules are named with it.
#
#   scripts/mutate.sh flow                                    # the module's default tests (below)
#   TIMEOUT_MULTIPLIER=4 scripts/mutate.sh data_pipeline/loader                       # a data module
#   scripts/mutate.sh convert tests/test_convert.py -k infer  # other tests / pytest options
#   MUTANTS='recam_jax.convert.x_infer_config__mutmut_*' scripts/mutate.sh convert  # some functions
#   KEEP=1 MUTANTS='recam_jax.flow.x__bump__mutmut_5' scripts/mutate.sh flow        # rerun survivors
#
# mutmut reads its config from the working directory and copies the project into mutants/, so the
# run happens in a scratch project, build/mutmut/PACKAGE_MODULE/ (git-ignored), made fresh every time:
# every figure comes from a clean run. Each mutant runs the tests that reach the mutated function,
# in one process (-n 0: no xdist workers), stopping at the first failure. The last line is the
# module's row of the table in docs/testing.md; `cd build/mutmut/PACKAGE_MODULE && mutmut show NAME`
# prints a survivor's diff.
set -euo pipefail

target=${1:?usage: scripts/mutate.sh [PACKAGE/]MODULE [PYTEST_ARGS...], e.g. scripts/mutate.sh flow}
shift
case $target in
  */*) package=${target%%/*} module=${target#*/} ;;
  *) package=recam_jax module=$target ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -f "$repo/$package/$module.py" ]] || { echo "no module $package/$module.py" >&2; exit 2; }

# The tests that cover each module and run in seconds (the slow mesh-parity tests are left out).
if (($# == 0)); then
  case $package/$module in
    recam_jax/flow) set -- tests/test_flow.py ;;
    recam_jax/optim) set -- tests/test_optim.py ;;
    recam_jax/sharding) set -- tests/test_sharding.py -k "not dit_on_mesh" ;;
    recam_jax/checkpoint) set -- tests/test_checkpoint.py ;;
    recam_jax/torch_io) set -- tests/test_torch_io.py ;;
    recam_jax/convert) set -- tests/test_convert.py tests/test_official_parity.py \
      "tests/test_dit.py::test_camera_path_matches_reference_with_trained_weights[False]" ;;  # + the layouts of values
    data_pipeline/cameras) set -- tests/test_data_cameras.py ;;
    data_pipeline/tfrecord) set -- tests/test_data_tfrecord.py ;;
    data_pipeline/shards) set -- tests/test_data_shards.py tests/test_data_loader.py -k "not worker" ;;
    data_pipeline/loader) set -- tests/test_data_loader.py -k "not worker" ;;  # all but the 20 s worker-process test
    *) echo "no default tests for $package/$module: pass the test files after the module name" >&2; exit 2 ;;
  esac
fi

mutmut=${MUTMUT:-mutmut}  # the test extra installs it: pip install -e ".[test]"
work=$repo/build/mutmut/${package}_$module
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
  echo "source_paths = $package"
  echo "only_mutate = $package/$module.py"
  echo "also_copy ="
  for path in recam_jax configs data_pipeline launch pytest.ini; do [[ $path == "$package" ]] || echo "    $path"; done
  echo "pytest_add_cli_args_test_selection ="
  for arg in "$@"; do echo "    $arg"; done
  echo "pytest_add_cli_args = -n 0"
  echo "use_git_change_detection = false"
  # A mutant that hangs (an endless iterator) is killed after this many times the tests' own time.
  echo "timeout_multiplier = ${TIMEOUT_MULTIPLIER:-15}"
  # Fork mutant runs from a process that has imported the tests but never started XLA: forking a
  # process whose XLA runtime threads are running deadlocks the child.
  echo "process_isolation = forkserver"
} >"$work/setup.cfg"

cd "$work"
# shellcheck disable=SC2086  # MUTANTS is a list of globs
nice -n 10 "$mutmut" run --max-children "${MUTMUT_CHILDREN:-1}" ${MUTANTS:-} | tr '\r' '\n' | LC_ALL=C grep -av $'^\xe2[\xa0-\xa3]' || true  # without the spinner lines
echo "not killed:"
"$mutmut" results
python - "$package" "$module" <<'PY'
"""The module's row: mutants made, run, killed (a test failed or timed out), not killed, score."""
import collections, datetime, json, sys

from mutmut.stats import status_by_exit_code

package, module = sys.argv[1:]
with open(f"mutants/{package}/{module}.py.meta") as f:
    codes = list(json.load(f)["exit_code_by_key"].values())
status = collections.Counter(status_by_exit_code[c] for c in codes if c is not None)
killed = status["killed"] + status["timeout"]
tested = sum(status.values())
print(dict(status))
print(f"| {module}.py | {len(codes)} | {tested} | {killed} | {tested - killed} | {killed / max(tested, 1):.1%} | "
      f"{datetime.date.today()} |")
PY
