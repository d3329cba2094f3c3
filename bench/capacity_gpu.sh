#!/usr/bin/env bash
# Capacity sweep on one GPU, in one device call (issue 11): a server with full-size dummy weights, then
# `omnivox capacity` on the standard workload (open-loop Poisson rates, lowest first, stops after two failing rates).
#
# Usage: bash bench/capacity_gpu.sh [OUT_DIR]          (default: $OUT, else out/capacity)
# Knobs (environment): RATES (0.5,1,2,4,8,16,32,64)  DURATION (30 s window per rate)  WARMUP (8 s)
#   ENDPOINT (chat | speech | mix)  WORKLOAD (a .jsonl; default the standard workload)  ENGINE_PATH (fast)
#   MAX_CONCURRENT (stream slots; empty = the engine's default, as many as GPU memory holds; more get a 429)
#   TTFA_BOUND (300 ms)  PREWARM (0; 1: PREWARM_STREAMS (16) chat requests at once before the sweep, untimed, for
#   an engine that captures graphs lazily; PREWARM_TIMEOUT 90 s)  MODEL_ARGS ("--dummy-weights --device cuda")
#   BUDGET (520 s for the whole script, start-up included; the script stops at once when it cannot hold one rate
#   after STARTUP_ESTIMATE (60 s))  READY_TIMEOUT (300 s)  PORT (a free one)
#   SERVER_TREE (run the server from that checkout's root, e.g. an older engine, swept by this client in the
#   same device call; `python -m` puts the working directory first on the path, so PYTHONPATH alone would not do)
#   CLIENT_PROCESSES (processes the client sends and listens from; empty = one per four cores, at most 8)
# Writes under OUT_DIR: server.log, prewarm.log, capacity.log, capacity.json (every request; rewritten after each
# rate), capacity.png, metrics.txt (the server's last /metrics), nvidia-smi.txt. Prints the table last.
set -uo pipefail
t0=$SECONDS
out=${1:-${OUT:-out/capacity}}
rates=${RATES:-0.5,1,2,4,8,16,32,64}
duration=${DURATION:-30}
warmup=${WARMUP:-8}
endpoint=${ENDPOINT:-chat}
workload=${WORKLOAD:-}  # a .jsonl file; empty: the standard workload
engine_path=${ENGINE_PATH:-fast}
max_concurrent=${MAX_CONCURRENT:-}
bound=${TTFA_BOUND:-300}
prewarm=${PREWARM:-0}
prewarm_streams=${PREWARM_STREAMS:-16}
prewarm_timeout=${PREWARM_TIMEOUT:-90}
budget=${BUDGET:-520}
ready_timeout=${READY_TIMEOUT:-300}
py=${PYTHON:-python3}
port=${PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
url="http://127.0.0.1:$port"
model_args=${MODEL_ARGS:---dummy-weights --device cuda}  # a CPU smoke test: MODEL_ARGS="--device cpu" (tiny model)
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

# a budget that cannot hold one rate after start-up wastes the device call: say so before starting anything
startup=${STARTUP_ESTIMATE:-60}  # seconds to a ready server; H200, dummy weights: 40-66 s
request_timeout=60  # the sweep's --timeout: it bounds a rate's drain
table_s=20  # after the sweep: the table, the plot and clean-up
rate_s=$("$py" -m omnivox.cli capacity --rate-seconds --duration "$duration" --warmup "$warmup" \
    --timeout "$request_timeout" \
    ${workload:+--workload "$workload"}) || { echo "cannot work out how long a rate takes"; exit 2; }
need=$(awk -v s="$startup" -v r="$rate_s" -v t="$table_s" 'BEGIN { printf "%d", s + r + t + 0.999 }')
if [ "$budget" -lt "$need" ]; then
    echo "BUDGET=${budget} s cannot hold one rate: start-up about ${startup} s (STARTUP_ESTIMATE), a rate up to" \
        "${rate_s} s (warm-up, window, drain), ${table_s} s for the table; give at least ${need} s" | tee "$out/capacity.log"
    exit 2
fi

# shellcheck disable=SC2086  # MODEL_ARGS is a list of words
(cd "${SERVER_TREE:-.}" && PYTHONPATH="$PWD:$PYTHONPATH" exec "$py" -m omnivox.cli serve $model_args --path "$engine_path" \
    ${max_concurrent:+--max-concurrent-requests "$max_concurrent"} --port "$port") > "$out/server.log" 2>&1 &
server=$!
stop_server() {
    kill "$server" 2>/dev/null || return 0
    for _ in $(seq 1 20); do kill -0 "$server" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$server" 2>/dev/null
}
trap stop_server EXIT
trap 'stop_server; exit 143' INT TERM

echo "waiting for $url/readyz (model build, warm-up and compile; at most ${ready_timeout} s)"
ready=0
for _ in $(seq 1 "$ready_timeout"); do
    if curl -sf "$url/readyz" > "$out/readyz.json" 2>/dev/null; then ready=1; break; fi
    kill -0 "$server" 2>/dev/null || { echo "server exited during start-up:"; tail -40 "$out/server.log"; exit 1; }
    sleep 1
done
if [ "$ready" != 1 ]; then echo "server not ready after ${ready_timeout} s:"; tail -40 "$out/server.log"; exit 1; fi
echo "ready after $((SECONDS - t0)) s: $(cat "$out/readyz.json")"

if [ "$prewarm" = 1 ]; then
    # untimed: whatever the engine initialises lazily under load happens here, not inside the first measured rate
    timeout "$prewarm_timeout" "$py" -m omnivox.cli loadtest --url "$url" --concurrency "$prewarm_streams" \
        --requests "$prewarm_streams" --endpoint chat ${workload:+--workload "$workload"} --out "$out/prewarm.json" > "$out/prewarm.log" 2>&1
    prc=$?
    echo "pre-warm done after $((SECONDS - t0)) s (exit $prc): $(grep -E '^(requests|TTFB)' "$out/prewarm.log" | tr '\n' ' ')"
fi

left=$((budget - (SECONDS - t0) - table_s))
[ "$left" -gt 0 ] || left=1  # out of time already: the sweep starts no rate but still writes its file
echo "sweep: rates $rates, ${duration} s window after ${warmup} s warm-up, $endpoint, budget ${left} s"
timeout --signal=INT --kill-after=10 "$((left + 30))" \
    "$py" -m omnivox.cli capacity --url "$url" --sweep "$rates" --duration "$duration" --warmup "$warmup" \
    ${workload:+--workload "$workload"} --endpoint "$endpoint" --ttfa-bound "$bound" --timeout "$request_timeout" --budget "$left" \
    ${CLIENT_PROCESSES:+--client-processes "$CLIENT_PROCESSES"} \
    --out "$out/capacity.json" > "$out/capacity.log" 2>&1
rc=$?
echo "sweep exit $rc after $((SECONDS - t0)) s"
curl -sf "$url/metrics" > "$out/metrics.txt" 2>/dev/null
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
grep -E "^rate " "$out/capacity.log"
[ "$rc" = 0 ] || tail -5 "$out/capacity.log"
stop_server
trap - EXIT INT TERM
if [ -s "$out/capacity.json" ]; then
    COLUMNS=200 "$py" -m omnivox.cli capacity --show "$out/capacity.json" --plot "$out/capacity.png"
else
    echo "no capacity.json: the sweep measured nothing"; tail -40 "$out/capacity.log"; exit 1
fi
exit "$rc"
