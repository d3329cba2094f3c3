#!/usr/bin/env bash
# Load test on a GPU: one server (full-size dummy weights, chosen path), then 1, 8 and 32 concurrent streams.
# Usage: bash bench/loadtest_gpu.sh OUT_DIR [PATH=fast]
set -uo pipefail
out=${1:-out/loadtest}; path=${2:-fast}; port=8123
mkdir -p "$out"
python3 -m omnivox.cli serve --dummy-weights --device cuda --path "$path" --max-concurrent-requests 32 \
    --port $port > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
    kill -0 $server 2>/dev/null || { echo "server died"; tail -30 "$out/server.log"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/readyz" || { echo "server not ready"; tail -30 "$out/server.log"; exit 1; }
echo
for c in 1 8 32; do
    n=$(( c < 4 ? 12 : 2 * c ))
    python3 -m omnivox.cli loadtest --url "http://127.0.0.1:$port" --concurrency $c --requests $n \
        --endpoint chat --out "$out/c$c.json" 2>&1 | tail -12
done
