#!/usr/bin/env bash
# Ray Serve next to the plain server on one GPU (full-size dummy weights, one replica), one after the other so they
# never share the GPU: low-rate TTFA (one stream at a time: the overhead Ray's proxy hop adds), then a concurrency
# ladder (1, 8, 16 streams; plus `omnivox loadtest --sweep` when this build has it) through each.
# Needs `pip install 'omnivox[ray]'`. Usage: bash bench/ray_capacity_gpu.sh [OUT_DIR=$OUT] [PATH=fast]
# Writes OUT_DIR/{plain,ray}/*.json (loadtest results schema), server logs, and OUT_DIR/ray_overhead.json.
set -uo pipefail
out=${1:-${OUT:-out/ray_capacity}}; path=${2:-fast}; port=8123; slots=16
mkdir -p "$out"
py=${PYTHON:-python3}
engine=(--dummy-weights --device cuda --path "$path" --max-concurrent-requests $slots)

wait_ready() {  # pid log
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && return 0
        kill -0 "$1" 2>/dev/null || { echo "server died"; tail -40 "$2"; return 1; }
        sleep 1
    done
    echo "server not ready after 300 s"; tail -40 "$2"; return 1
}

stop() {  # pid: SIGTERM (Ray: serve.shutdown + ray.shutdown), then wait, then kill
    kill -TERM "$1" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
    kill -9 "$1" 2>/dev/null
}

measure() {  # label
    local dir="$out/$1"; mkdir -p "$dir"
    curl -s "http://127.0.0.1:$port/readyz"; echo
    for endpoint in speech chat; do  # low rate: one stream at a time, TTFA without queueing
        echo "== $1: $endpoint, concurrency 1"
        $py -m omnivox.cli loadtest --url "http://127.0.0.1:$port" --concurrency 1 --requests 24 \
            --endpoint $endpoint --out "$dir/low_$endpoint.json" 2>&1 | tail -8
    done
    for c in 1 8 16; do
        echo "== $1: chat, concurrency $c"
        $py -m omnivox.cli loadtest --url "http://127.0.0.1:$port" --concurrency $c --requests $(( c < 4 ? 12 : 3 * c )) \
            --endpoint chat --out "$dir/c$c.json" 2>&1 | tail -8
    done
    if $py -m omnivox.cli loadtest --help 2>/dev/null | grep -q -- "--sweep"; then
        echo "== $1: capacity sweep"
        $py -m omnivox.cli loadtest --url "http://127.0.0.1:$port" --sweep --out "$dir/sweep.json" 2>&1 | tail -20
    fi
    curl -s "http://127.0.0.1:$port/metrics" > "$dir/metrics.txt"
}

echo "#### plain server"
$py -m omnivox.cli serve "${engine[@]}" --port $port > "$out/plain_server.log" 2>&1 &
pid=$!
wait_ready $pid "$out/plain_server.log" && measure plain
stop $pid

echo "#### Ray Serve, one replica"
$py -m omnivox.cli serve --ray --replicas 1 "${engine[@]}" --port $port > "$out/ray_server.log" 2>&1 &
pid=$!
wait_ready $pid "$out/ray_server.log" && { curl -s "http://127.0.0.1:$port/replica"; echo; measure ray; }
stop $pid
ray stop --force > /dev/null 2>&1  # agents of the local Ray instance were seen to outlive a SIGTERM-ed driver
tail -5 "$out/ray_server.log"

$py - "$out" <<'EOF'
"""TTFA through Ray vs plain, one stream at a time: client TTFB p50/p95 and its part outside the engine."""
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
report = {}
for endpoint in ("speech", "chat"):
    row = {}
    for label in ("plain", "ray"):
        path = out / label / f"low_{endpoint}.json"
        if not path.exists():
            continue
        samples = [s for s in json.loads(path.read_text())["samples"] if "error" not in s]
        ttfb = sorted(s["ttfb_s"] for s in samples)
        hop = [s["ttfb_s"] - s["server_ttfb_s"] for s in samples if s.get("server_ttfb_s") == s.get("server_ttfb_s")]
        row[label] = {"n": len(samples), "ttfb_p50_ms": 1e3 * statistics.median(ttfb),
                      "ttfb_p95_ms": 1e3 * ttfb[int(0.95 * (len(ttfb) - 1))],
                      "outside_engine_p50_ms": 1e3 * statistics.median(hop) if hop else None}
    if len(row) == 2:
        row["ray_minus_plain_p50_ms"] = row["ray"]["ttfb_p50_ms"] - row["plain"]["ttfb_p50_ms"]
    report[endpoint] = row
(out / "ray_overhead.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
