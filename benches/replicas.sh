#!/usr/bin/env bash
# Replicas on one PostgreSQL (issue 10): REPLICAS proxies sharing a store,
# USERS connections, access tokens expiring every EXPIRES seconds.
#
#     benches/replicas.sh                      # about 2 minutes
#     REPLICAS=3 benches/connections.sh        # the same (dispatches here)
#
# What it does (loopback only):
#   - builds `cargo build --release` (SKIP_BUILD=1 uses the existing binary);
#   - starts a throwaway PostgreSQL cluster in $OUT/work-replicas/pg (initdb +
#     pg_ctl from /usr/lib/postgresql/*/bin, as `postgres` when root), the
#     sandbox with USERS users, and REPLICAS proxies on one database;
#   - connects every user through replica 0's admin API;
#   - cold users: each user's first request on replica 1 (one store read),
#     timed with curl; then the same requests again (warm), for p50/p99;
#   - load: one wrk per replica (CONNS / REPLICAS connections each, random
#     users) for DURATION s; token requests across the fleet against the
#     number a refresh-ahead schedule needs for one replica (target 1.0),
#     and store operations per proxied request.
# Writes bench-results/replicas.md.
#
# Settings: REPLICAS (3), USERS (1000), CONNS (48), DURATION (60),
# EXPIRES (30), PORT_BASE (23000), OUT (bench-results), SKIP_BUILD, BIN (a
# binary to use instead of the release build).

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPLICAS=${REPLICAS:-3}
USERS=${USERS:-1000}
CONNS=${CONNS:-48}
DURATION=${DURATION:-60}
EXPIRES=${EXPIRES:-30}
PORT_BASE=${PORT_BASE:-23000}
OUT=${OUT:-$ROOT/bench-results}
WORK="$OUT/work-replicas"
BIN=${BIN:-$ROOT/target/release/flinks-proxy}
PIDS=()
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

log() { printf '[replicas] %s\n' "$*" >&2; }
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pg_stop
}
trap cleanup EXIT

command -v wrk >/dev/null || { log "wrk is needed (apt-get install -y wrk)"; exit 1; }
[[ ${SKIP_BUILD:-} == 1 ]] || (cd "$ROOT" && cargo build --release)
rm -rf "$WORK"
mkdir -p "$WORK"

sum_metric() {
    local total=0 v
    for i in $(seq 0 $((REPLICAS - 1))); do
        v=$(curl -s "http://127.0.0.1:$((PORT_BASE + 2 * i + 1))/metrics" |
            awk -v p="$1" 'index($1, p) == 1 { s += $2 } END { printf "%d", s }')
        total=$((total + v))
    done
    echo "$total"
}

log "PostgreSQL cluster on port $((PORT_BASE + 99))"
pg_start $((PORT_BASE + 99))
sandbox_start --users "$USERS" --expires-in "$EXPIRES"
KEY=$("$BIN" keygen)
for i in $(seq 0 $((REPLICAS - 1))); do
    cat >"$WORK/proxy$i.toml" <<EOF
[server]
listen = "127.0.0.1:$((PORT_BASE + 2 * i))"
[admin]
listen = "127.0.0.1:$((PORT_BASE + 2 * i + 1))"
[log]
level = "warn"
[store]
url = "$(pg_url bench)"
key = "$KEY"
[connections.users]
token_url = "$TOKEN_URL"
client_id = "demo-client"
client_secret = "demo-secret"
redirect_uri = "https://example.com/callback"
cache_size = $USERS
[routes.pooled]
path_prefix = "/"
upstream = "$API_URL"
connections = "users"
reauth_on = []
EOF
    "$BIN" --config "$WORK/proxy$i.toml" >"$WORK/proxy$i.out" 2>"$WORK/proxy$i.err" &
    PIDS+=("$!")
    wait_http "http://127.0.0.1:$((PORT_BASE + 2 * i + 1))/readyz"
done

log "connecting $USERS users through replica 0"
seq 0 $((USERS - 1)) | xargs -P 8 -I{} curl -s -o /dev/null -w '%{http_code}\n' -X POST \
    "http://127.0.0.1:$((PORT_BASE + 1))/connections/users" -d '{"code": "code-u{}"}' | sort | uniq -c >"$WORK/connect.txt"
[[ $(awk '$2 == 201 { print $1 }' "$WORK/connect.txt") -eq $USERS ]] || { log "not every user connected: $(cat "$WORK/connect.txt")"; exit 1; }

R1="http://127.0.0.1:$((PORT_BASE + 2))"
timed() {
    for u in $(seq 0 $((USERS - 1))); do
        curl -s -o /dev/null -w '%{time_total}\n' -H "X-Flinks-Connection: u$u" "$R1/status/200"
    done
}
log "cold users: first request of each on replica 1"
timed >"$WORK/cold.txt"
timed >"$WORK/warm.txt"

cat >"$WORK/load.lua" <<EOF
local users = $USERS
math.randomseed(os.time() + tonumber(string.sub(tostring({}), -6), 16))
request = function()
    return wrk.format("GET", "/status/200", { ["X-Flinks-Connection"] = "u" .. math.random(0, users - 1) })
end
done = function(summary, latency, requests)
    io.write(string.format("RESULT requests=%d non2xx=%d errors=%d p99_us=%d\n", summary.requests,
        summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
        latency:percentile(99)))
end
EOF
SERIES_REFRESH='flinks_proxy_connection_token_requests_total{outcome="success",pool="users"}'
refresh0=$(sum_metric "$SERIES_REFRESH")
ops0=$(sum_metric 'flinks_proxy_store_operations_total{')
log "load: $CONNS connections over $REPLICAS replicas for $DURATION s"
WRK_PIDS=()
for i in $(seq 0 $((REPLICAS - 1))); do
    wrk -t1 -c$((CONNS / REPLICAS)) -d"${DURATION}s" --timeout 5s -s "$WORK/load.lua" \
        "http://127.0.0.1:$((PORT_BASE + 2 * i))" | grep '^RESULT' >"$WORK/wrk$i.txt" &
    WRK_PIDS+=("$!")
done
wait "${WRK_PIDS[@]}"
sleep 0.5
refreshes=$(( $(sum_metric "$SERIES_REFRESH") - refresh0 ))
ops=$(( $(sum_metric 'flinks_proxy_store_operations_total{') - ops0 ))
requests=$(cat "$WORK"/wrk*.txt | sed -n 's/.*requests=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s }')
bad=$(cat "$WORK"/wrk*.txt | sed -n 's/.*non2xx=\([0-9]*\) errors=\([0-9]*\).*/\1 \2/p' | awk '{ s += $1 + $2 } END { print s }')
expected=$(awk -v u="$USERS" -v d="$DURATION" -v e="$EXPIRES" 'BEGIN { printf "%d", u * int(d / (e / 2)) }')

mkdir -p "$OUT"
{
    echo "## Replicas ($REPLICAS proxies on one PostgreSQL, $USERS users, tokens of ${EXPIRES} s)"
    echo
    echo "- $(nproc) CPUs, $(uname -r); flinks-proxy $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- cold user's first request on a replica (one store read): p50 $(pct 50 <"$WORK/cold.txt") ms, p99 $(pct 99 <"$WORK/cold.txt") ms; the same requests warm: p50 $(pct 50 <"$WORK/warm.txt") ms, p99 $(pct 99 <"$WORK/warm.txt") ms (curl, sequential)"
    echo "- load: $requests requests in ${DURATION} s over $REPLICAS replicas, $bad non-2xx or errors"
    echo "- token requests across the fleet: $refreshes; one replica's refresh-ahead schedule needs $expected; per expiry per user: $(awk -v r="$refreshes" -v e="$expected" 'BEGIN { printf "%.2f", e ? r / e : 0 }')"
    echo "- store operations per proxied request (warm caches, refreshes and the 5 s re-check included): $(awk -v o="$ops" -v r="$requests" 'BEGIN { printf "%.3f", r ? o / r : 0 }')"
} | tee "$OUT/replicas.md"
