#!/usr/bin/env bash
# Runs (or resumes) the pre-registered MetaWorld confirmation study from its registered commit.
#   bash docs/results/metaworld_confirm/run.sh [study key=value ...]   e.g. report_only=true
# The registered commit is the one that added this folder's README.md. It is checked out once into a
# worktree beside this checkout (CONFIRM_TREE), and the study runs there with this checkout's .venv
# (PYTHON), so later changes to the code here cannot reach the runs. Run directories go to CONFIRM_RUNS;
# the page and the archived runs are written into this checkout's docs/results/metaworld_confirm/.
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
commit=$(git -C "$repo" log --diff-filter=A --format=%H -- docs/results/metaworld_confirm/README.md | tail -1)
[ -n "$commit" ] || { echo "run.sh: docs/results/metaworld_confirm/README.md is not committed yet" >&2; exit 1; }
tree=${CONFIRM_TREE:-$repo/../pcm-confirm-${commit:0:10}}
runs=${CONFIRM_RUNS:-$repo/../study_runs/metaworld_confirm}
python=${PYTHON:-$repo/.venv/bin/python}
if [ ! -d "$tree" ]; then
    git -C "$repo" worktree add --detach "$tree" "$commit"
fi
[ "$(git -C "$tree" rev-parse HEAD)" = "$commit" ] || { echo "run.sh: $tree is not at $commit" >&2; exit 1; }
cd "$tree"
echo "metaworld_confirm: code $commit ($tree), runs $runs, page $repo/docs/results/metaworld_confirm" >&2
# PYTHONPATH puts the worktree's packages before the checkout's editable install, here and in the Ray env workers
export PYTHONPATH="$tree"
exec "$python" -m pcm_train.study suite=metaworld_confirm runs="$runs" out="$repo/docs/results/metaworld_confirm" "$@"
