#!/usr/bin/env bash
# The batched engine on one GPU, in one device call (issue 12): step time against batch size, batched vs reference
# equivalence (fp32 exactness, bf16 agreement), single-stream TTFB/RTF; with OLD_TREE (a checkout of the engine
# before batching, e.g. `git archive 67d86ad | tar -x -C .old`) also that engine's single-stream figures.
# Usage: bash bench/batched_gpu.sh OUT_DIR     Knobs: BATCHES (1,2,4,...,256)  OLD_TREE (unset: skipped)
# Writes OUT_DIR/{steps,eq32,eq16,old}.{log,json}; prints a summary last.
set -uo pipefail
out=${1:-${OUT:-out/batched}}
batches=${BATCHES:-1,2,4,8,16,32,64,128,256}
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the old engine runs from its own tree
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? after ${SECONDS}s"
}
bb=("$py" -m omnivox.bench.batch_bench --dummy-weights --device cuda)
run steps 150 "${bb[@]}" --out /tmp/bb-steps --parts steps --batches "$batches" --repeats 20
run eq32 150 "${bb[@]}" --out /tmp/bb-eq32 --parts equivalence --precision fp32 --requests 8 --seconds 2
run eq16 150 "${bb[@]}" --out /tmp/bb-eq16 --parts equivalence,single --requests 16 --seconds 2 --trials 3
for part in steps eq32 eq16; do cp "/tmp/bb-$part/batch_bench.json" "$out/$part.json" 2>/dev/null; done
if [ -n "${OLD_TREE:-}" ]; then
    # from the old tree's root: `python -m` puts the working directory first on the path, so with PYTHONPATH alone
    # the old engine's figures would be this tree's
    (cd "$OLD_TREE" && run old 200 env PYTHONPATH="$OLD_TREE:$PYTHONPATH" "$py" -m omnivox.cli bench --dummy-weights \
        --device cuda --path fast --trials 3 --out /tmp/bb-old)
    cp /tmp/bb-old/results.json "$out/old.json" 2>/dev/null
    grep -E "ttfb|rtf|TTFB|RTF" "$out/old.log" | tail -8
fi
for f in steps eq32 eq16; do echo "== $f"; grep -vE "^\s*'|^\{|^\}" "$out/$f.log" | tail -16; done
