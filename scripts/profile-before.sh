#!/usr/bin/env bash
# The "before" per-phase profile: `harness profile --phases` run by an older commit's own code
# (a detached worktree of BEFORE, default the commit before the host-work changes) with this
# checkout's .venv, written to OUT (make profile-phases-before: results/profile-phases-before.json). Profile "after" right after it
# (make profile-phases) so that both run in one sitting on the same machine and core.
# Usage: scripts/profile-before.sh COMMIT OUT METHODS SPLIT LIMIT [overrides...]
set -euo pipefail
commit=$1 out=$2 methods=$3 split=$4 limit=$5
shift 5
repo=$(pwd)
tree=$(mktemp -d /tmp/harness-before.XXXXXX)
cleanup() { git -C "$repo" worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"; }
trap cleanup EXIT
git worktree add --quiet --detach "$tree" "$commit"
# python -m runs the worktree's harness package (the current directory comes first on sys.path)
(cd "$tree" && HARNESS_DATA_DIR="${HARNESS_DATA_DIR:-$repo/../shared/datasets}" "$repo/.venv/bin/python" -m harness.cli \
  profile --phases --methods "$methods" --task humaneval "task.split=$split" --limit "$limit" \
  --max-new-tokens 128 run.threads=1 --json "$tree/profile-phases-before.json" "$@")
cp "$tree/profile-phases-before.json" "$out"
echo "wrote $out (commit $commit)"
