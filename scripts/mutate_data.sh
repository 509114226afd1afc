#!/usr/bin/env bash
# Mutation testing of one data_pipeline module with mutmut (docs/data.md has the scores).
#
#   scripts/mutate_data.sh tfrecord      # mutates data_pipeline/tfrecord.py, runs the tests that cover it
#   scripts/mutate_data.sh loader tests/test_data_loader.py -k eval   # other tests / pytest options
#
# mutmut reads its config from the working directory and copies the project into mutants/, so the
# run happens in a scratch project, build/mutmut/data_MODULE/ (git-ignored), made fresh every time.
# Tests run in one process each (-n 0: no xdist workers). `cd build/mutmut/data_MODULE && mutmut show NAME`
# prints a survivor's diff.
set -euo pipefail

module=${1:?usage: scripts/mutate_data.sh MODULE [PYTEST_ARGS...], e.g. scripts/mutate_data.sh tfrecord}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -f "$repo/data_pipeline/$module.py" ]] || { echo "no module data_pipeline/$module.py" >&2; exit 2; }

if (($# == 0)); then  # the test files that exercise each module directly and run in seconds
  case $module in
    cameras) set -- tests/test_data_cameras.py ;;
    tfrecord) set -- tests/test_data_tfrecord.py ;;
    shards) set -- tests/test_data_shards.py tests/test_data_loader.py -k "not worker" ;;
    loader) set -- tests/test_data_loader.py -k "not worker" ;;  # all but the 20 s worker-process test
    *) echo "no default tests for $module: pass the test files after the module name" >&2; exit 2 ;;
  esac
fi

mutmut=${MUTMUT:-mutmut}
work=$repo/build/mutmut/data_$module
rm -rf "$work"
mkdir -p "$work"
for path in recam_jax tests configs data_pipeline pytest.ini; do
  ln -s "$repo/$path" "$work/$path"
done
[[ -e "$repo/../shared" ]] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"  # fixtures, seen from mutants/

{
  echo "[mutmut]"
  echo "source_paths = data_pipeline"
  echo "only_mutate = data_pipeline/$module.py"
  echo "also_copy ="
  for path in recam_jax configs pytest.ini; do echo "    $path"; done
  echo "pytest_add_cli_args_test_selection ="
  for arg in "$@"; do echo "    $arg"; done
  echo "pytest_add_cli_args = -n 0"  # pytest.ini adds -n 2, so xdist stays loaded, with no workers
  echo "use_git_change_detection = false"
  echo "timeout_multiplier = 4"  # a mutant that hangs (an endless iterator) costs 4x the tests, not 15x
} >"$work/setup.cfg"

cd "$work"
nice -n 10 "$mutmut" run --max-children "${MUTMUT_CHILDREN:-1}" || true
echo "survivors (and other not-killed mutants):"
"$mutmut" results
"$mutmut" export-cicd-stats >/dev/null
cat mutants/mutmut-cicd-stats.json
