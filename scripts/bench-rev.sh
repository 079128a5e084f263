#!/usr/bin/env bash
# Benchmark git revision REV ("before") against this working tree ("after"), run by run:
#
#   scripts/bench-rev.sh REV [bench/run.py options]     # default: --cases fanout-100,fanout-1000 --runs 3
#
# REV is checked out in a detached worktree with its own venv under
# ${BENCH_REV_DIR:-~/.cache/dwsps-bench}/<commit>, kept for the next comparison (remove it with
# `git worktree remove <dir>`). Options after REV go to bench/run.py and override the defaults.
set -euo pipefail

if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: $0 REV [bench/run.py options]" >&2
    exit 2
fi
rev=$1
shift
cd "$(dirname "$0")/.."
if ! sha=$(git rev-parse --verify --quiet "$rev^{commit}"); then
    echo "$0: $rev is not a commit" >&2
    exit 2
fi
dir=${BENCH_REV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dwsps-bench}/${sha:0:12}

if [ ! -x "$dir/.venv/bin/dwsps" ]; then
    if [ ! -e "$dir/.git" ]; then
        mkdir -p "$(dirname "$dir")"
        git worktree add --force --detach "$dir" "$sha"  # --force: a deleted cache dir may still be registered
    fi
    python3 -m venv "$dir/.venv"
    "$dir/.venv/bin/pip" install -q -e "$dir"
fi

make -s .venv/.bench-installed
exec .venv/bin/python bench/run.py \
    --target "before=$dir/.venv/bin/dwsps" --target after=.venv/bin/dwsps \
    --cases fanout-100,fanout-1000 --runs 3 "$@"
