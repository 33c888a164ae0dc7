#!/usr/bin/env bash
# Runs (or resumes) a pre-registered study from its registered commit.
#   bash docs/results/run_registered.sh SUITE [study key=value ...]   e.g. metaworld_deploy report_only=true
# SUITE's page is docs/results/SUITE/. Its registered commit is the one that added that folder's README.md (the
# protocol). The commit is checked out once into a worktree beside this checkout (CONFIRM_TREE), and the study
# runs there with this checkout's .venv (PYTHON), so later changes to the code here cannot reach the runs. Run
# directories go to CONFIRM_RUNS; the page and the archived runs are written into this checkout's page folder.
set -euo pipefail
suite=${1:?usage: run_registered.sh SUITE [key=value ...]}
shift
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
page=docs/results/$suite
commit=$(git -C "$repo" log --diff-filter=A --format=%H -- "$page/README.md" | tail -1)
[ -n "$commit" ] || { echo "run_registered.sh: $page/README.md is not committed yet" >&2; exit 1; }
tree=${CONFIRM_TREE:-$repo/../pcm-confirm-${commit:0:10}}
runs=${CONFIRM_RUNS:-$repo/../study_runs/$suite}
python=${PYTHON:-$repo/.venv/bin/python}
if [ ! -d "$tree" ]; then
    git -C "$repo" worktree add --detach "$tree" "$commit"
fi
[ "$(git -C "$tree" rev-parse HEAD)" = "$commit" ] || { echo "run_registered.sh: $tree is not at $commit" >&2; exit 1; }
cd "$tree"
echo "$suite: code $commit ($tree), runs $runs, page $repo/$page" >&2
# PYTHONPATH puts the worktree's packages before the checkout's editable install, here and in the Ray env workers
export PYTHONPATH="$tree"
exec "$python" -m pcm_train.study suite="$suite" runs="$runs" out="$repo/$page" "$@"
