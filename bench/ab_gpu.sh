#!/usr/bin/env bash
# Two (or three) engine trees on one GPU in one device call, so a change is merged only when it wins on the same
# machine: one stream at a time (`batch_bench --parts single`) and a capacity sweep for each, tree A first, at the
# same rates.
#
# Usage: A=. B=.branch [C=.branch2] bash bench/ab_gpu.sh [OUT_DIR]      (default: $OUT, else out/ab)
#   A, B: checkouts' roots (e.g. `git archive multistep-tts | tar -x -C .branch`); each runs from its own root, as
#   `python -m` puts the working directory first on the path. The capacity client is always this tree's.
# Knobs: RATES (10,12,14)  DURATION (15)  WARMUP (4)  TRIALS (3, single part)  SWEEP_BUDGET (150 s a tree, server
#   start-up included; a rate needs about 60 s of it, and capacity_gpu.sh refuses a budget below start-up + one
#   rate + 20 s, 138 s with the defaults)  MODEL_ARGS ("--dummy-weights --device cuda"; a CPU smoke
#   test: "--device cpu", the tiny model)  A_ARGS, B_ARGS (more engine options for one tree, e.g. B=. B_ARGS=
#   "--attention blocks" compares two settings of one tree)  A_LABEL, B_LABEL (e.g. the tree's commit: printed,
#   and recorded as the commit of its results, which a `git archive` tree cannot know); C, C_ARGS, C_LABEL: an
#   optional third tree, run after B
# Writes OUT_DIR/{a,b,c}-single.json, {a,b,c}-capacity.json, {a,b,c}-capacity.png and ab.log; prints a summary
# last. Each tree's runs write straight under OUT_DIR (single-{a,b,c}/, cap-{a,b,c}/: server and client logs, the
# capacity document rewritten after each rate), so a `timeout` around this script loses nothing already measured.
set -uo pipefail
out=${1:-${OUT:-out/ab}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$PWD
py=${PYTHON:-python3}
model_args=${MODEL_ARGS:---dummy-weights --device cuda}
declare -A tree=([a]="$(cd "${A:?set A to a tree}" && pwd)" [b]="$(cd "${B:?set B to a tree}" && pwd)")
names="a b"
if [ -n "${C:-}" ]; then tree[c]="$(cd "$C" && pwd)"; names="a b c"; fi
log="$out/ab.log"
: > "$log"

declare -A extra=([a]="${A_ARGS:-}" [b]="${B_ARGS:-}" [c]="${C_ARGS:-}")
for name in $names; do
    root=${tree[$name]}
    args="$model_args ${extra[$name]}"
    label_var=${name^^}_LABEL
    export OMNIVOX_COMMIT=${!label_var:-}
    echo "== $name: one stream at a time ($root ${extra[$name]}; ${OMNIVOX_COMMIT})" | tee -a "$log"
    # shellcheck disable=SC2086  # MODEL_ARGS is a list of words
    (cd "$root" && PYTHONPATH="$root:${PYTHONPATH:-}" timeout 240 "$py" -m omnivox.bench.batch_bench $args \
        --out "$out/single-$name" --parts single --trials "${TRIALS:-3}") >> "$log" 2>&1
    mv "$out/single-$name/batch_bench.json" "$out/$name-single.json" 2>/dev/null && rmdir "$out/single-$name"
    echo "== $name: capacity" | tee -a "$log"
    SERVER_TREE="$root" RATES=${RATES:-10,12,14} DURATION=${DURATION:-15} WARMUP=${WARMUP:-4} TTFA_BOUND=1000 \
        BUDGET=${SWEEP_BUDGET:-150} MODEL_ARGS="$args" bash "$here/bench/capacity_gpu.sh" "$out/cap-$name" \
        >> "$log" 2>&1
    mv "$out/cap-$name/capacity.json" "$out/$name-capacity.json" 2>/dev/null
    mv "$out/cap-$name/capacity.png" "$out/$name-capacity.png" 2>/dev/null
done

"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("a", "b", "c"):
    if not any(out.glob(f"{name}-*")):
        continue
    single = out / f"{name}-single.json"
    if single.exists():
        s = json.loads(single.read_text())["single"]
        print(f"{name}: one stream TTFB p50 {s['ttfb_p50_ms']:.1f} ms, RTF p50 {s['rtf_p50']:.3f} (n={s['n']})")
    else:
        print(f"{name}: no single-stream result (see ab.log)")
    cap = out / f"{name}-capacity.json"
    for r in json.loads(cap.read_text())["extra"]["rates"] if cap.exists() else []:
        t = r["ttfa_s"]
        p95 = "-" if t["p95"] is None else f"{1e3 * t['p95']:.0f} ms"
        print(f"{name}: {r['rate']:g}/s p95 TTFA {p95}, underruns {r['underruns']}, playing "
              f"{r['streams_playing_mean']:.1f} (peak {r['streams_playing_peak']}), "
              f"{'pass' if r['passed'] else 'fail: ' + '; '.join(r['failures'])}")
EOF
