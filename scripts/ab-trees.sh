#!/usr/bin/env bash
# One command timed in two checkouts in turns, on a CUDA GPU: a template or planner change against the code before it,
# in one run on one card (the switches of ab-switches.sh cover changes kept behind an option; this covers the rest).
#   bash scripts/ab-trees.sh OLD_TREE ROUNDS -- COMMAND ...
# OLD_TREE is a checkout of the code before the change (e.g. `git archive HEAD | tar -x -C OLD_TREE`, kept inside the
# working tree where a borrowed GPU takes only the working tree); the current checkout is the new one. Each side
# keeps a kernel cache of its own (LAYERFORGE_CACHE_DIR), so no kernel built from one tree's source runs for the
# other's. ROUNDS rounds of old then new; each output line is prefixed "old N:" / "new N:".
set -uo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
    echo "usage: bash scripts/ab-trees.sh OLD_TREE ROUNDS -- COMMAND ..." >&2
    exit 2
fi
OLD=$(cd "$1" && pwd) ROUNDS=$2
shift 3
NEW=$PWD
PY=${PY:-python3}
. "$NEW/scripts/gpu-env.sh"
BASE=$PYTHONPATH
status=0
for round in $(seq 1 "$ROUNDS"); do
    for side in old new; do
        tree=$([ "$side" = old ] && echo "$OLD" || echo "$NEW")
        (cd "$tree" && PYTHONPATH="$tree:${BASE#"$NEW:"}" LAYERFORGE_CACHE_DIR="/tmp/lf-cache-ab-$side" "$@") 2>&1 \
            | sed "s/^/$side $round: /"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
done
exit $status
