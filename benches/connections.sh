#!/usr/bin/env bash
# Per-user connections under load (issue 9): USERS connections in an SQLite
# store, CONNS client connections each picking a user at random per request,
# access tokens expiring every EXPIRES seconds.
#
#     benches/connections.sh                         # about 2 minutes
#     USERS=1000 DURATION=20 benches/connections.sh  # quick check
#
# What it does (loopback only; wrk pinned to CPU LOAD_CPU, the proxy with
# `workers = 1` to CPU SERVER_CPU, the sandbox unpinned):
#   - builds `cargo build --release` (SKIP_BUILD=1 uses the existing binary);
#   - starts `flinks-proxy sandbox --users USERS --expires-in EXPIRES` and the
#     proxy with a pool `users` on an SQLite store (route `/`, select header
#     X-Flinks-Connection) and a client_credentials credential (route `/cred`)
#     on the same sandbox API;
#   - connects every user through the admin API (POST code-uI), then
#     restarts the proxy so that its cache is cold;
#   - run 1 (cold start, DURATION s): random users; reports req/s, p99,
#     non-2xx, store reads per user served from the store, token requests
#     (refreshes) against the number a refresh-ahead schedule needs, and RSS
#     with every user cached;
#   - runs 2 and 3 (warm, WARM_DURATION s each): the pooled route and the
#     credential route, CPU microseconds per request of the proxy process.
# Writes bench-results/connections.md.
#
# Settings: USERS (10000), CONNS (64), DURATION (60), WARM_DURATION (10),
# EXPIRES (30), LOAD_CPU (0), SERVER_CPU (1), PORT_BASE (22000),
# OUT (bench-results), SKIP_BUILD, PERF (set: `perf record` the proxy during
# the warm pooled run; self time by symbol in bench-results/connections-perf.txt).

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
USERS=${USERS:-10000}
CONNS=${CONNS:-64}
DURATION=${DURATION:-60}
WARM_DURATION=${WARM_DURATION:-10}
EXPIRES=${EXPIRES:-30}
LOAD_CPU=${LOAD_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
PORT_BASE=${PORT_BASE:-22000}
OUT=${OUT:-$ROOT/bench-results}
WORK="$OUT/work-connections"
BIN="$ROOT/target/release/flinks-proxy"
PROXY_PORT=$PORT_BASE
ADMIN_PORT=$((PORT_BASE + 1))
PIDS=()

log() { printf '[connections] %s\n' "$*" >&2; }
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
metric() { curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v s="$1" '$1 == s { print $2 }'; }
num() { awk -v v="${1:-0}" 'BEGIN { printf "%d", v }'; }

wait_http() {
    for _ in $(seq 1 200); do
        curl -s -o /dev/null "$1" && return 0
        sleep 0.05
    done
    log "timed out waiting for $1"
    exit 1
}

start_proxy() {
    taskset -c "$SERVER_CPU" "$BIN" --config "$WORK/proxy.toml" >"$WORK/proxy.out" 2>>"$WORK/proxy.err" &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"
}

# wrk Lua: random users on the pooled route (or the credential route), and
# the non-2xx count and latency percentiles at the end.
write_scripts() {
    cat >"$WORK/pooled.lua" <<EOF
local users = $USERS
math.randomseed(os.time())
request = function()
    return wrk.format("GET", "/status/200", { ["X-Flinks-Connection"] = "u" .. math.random(0, users - 1) })
end
EOF
    cat >"$WORK/cred.lua" <<'EOF'
request = function() return wrk.format("GET", "/cred/status/200") end
EOF
    cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("RESULT requests=%d non2xx=%d errors=%d p50_us=%d p99_us=%d\n",
        summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(99)))
end
EOF
    cat "$WORK/report.lua" >>"$WORK/pooled.lua"
    cat "$WORK/report.lua" >>"$WORK/cred.lua"
}

field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$2"; }

run_wrk() {
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${2}s" --timeout 5s -s "$1" \
        "http://127.0.0.1:$PROXY_PORT" | grep '^RESULT'
}

[[ ${SKIP_BUILD:-} == 1 ]] || (cd "$ROOT" && cargo build --release)
command -v wrk >/dev/null || { log "wrk is needed (apt-get install -y wrk)"; exit 1; }
rm -rf "$WORK"
mkdir -p "$WORK"
write_scripts

"$BIN" sandbox --users "$USERS" --expires-in "$EXPIRES" >"$WORK/sandbox.out" 2>"$WORK/sandbox.err" &
PIDS+=("$!")
for _ in $(seq 1 200); do grep -q '^api_url' "$WORK/sandbox.out" && break; sleep 0.05; done
TOKEN_URL=$(awk '/^token_url/ { print $2 }' "$WORK/sandbox.out")
API_URL=$(awk '/^api_url/ { print $2 }' "$WORK/sandbox.out")
KEY=$("$BIN" keygen)
cat >"$WORK/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"
workers = 1
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[log]
level = "warn"
[store]
url = "sqlite:connections.db"
key = "$KEY"
[connections.users]
token_url = "$TOKEN_URL"
client_id = "demo-client"
client_secret = "demo-secret"
redirect_uri = "https://example.com/callback"
cache_size = $USERS
[credentials.bench]
token_url = "$TOKEN_URL"
grant_type = "client_credentials"
client_id = "demo-client"
client_secret = "demo-secret"
[routes.pooled]
path_prefix = "/"
upstream = "$API_URL"
connections = "users"
reauth_on = []
[routes.cred]
path_prefix = "/cred"
strip_prefix = "/cred"
upstream = "$API_URL"
credential = "bench"
reauth_on = []
EOF
start_proxy

log "connecting $USERS users through the admin API"
started=$(date +%s)
seq 0 $((USERS - 1)) | xargs -P 16 -I{} curl -s -o /dev/null -w '%{http_code}\n' -X POST \
    "http://127.0.0.1:$ADMIN_PORT/connections/users" -d '{"code": "code-u{}"}' | sort | uniq -c >"$WORK/connect.txt"
connected=$(awk '$2 == 201 { print $1 }' "$WORK/connect.txt")
log "connected: $(tr '\n' ' ' <"$WORK/connect.txt")in $(($(date +%s) - started)) s"
[[ $(num "$connected") -eq $USERS ]] || { log "not every user connected"; exit 1; }

log "restarting the proxy: cold cache"
kill "$PROXY_PID"
wait "$PROXY_PID" 2>/dev/null || true
start_proxy

SERIES_REFRESH='flinks_proxy_connection_token_requests_total{outcome="success",pool="users"}'
SERIES_FROM_STORE='flinks_proxy_connection_tokens_total{pool="users",source="store"}'
SERIES_GETS='flinks_proxy_store_operations_total{op="get",outcome="ok"}'
log "run 1: $CONNS connections, random users, ${DURATION} s, tokens expiring every ${EXPIRES} s"
ticks0=$(cpu_ticks "$PROXY_PID")
cold=$(run_wrk "$WORK/pooled.lua" "$DURATION")
ticks1=$(cpu_ticks "$PROXY_PID")
rss=$(rss_kb "$PROXY_PID")
refreshes=$(num "$(metric "$SERIES_REFRESH")")
from_store=$(num "$(metric "$SERIES_FROM_STORE")")
gets=$(num "$(metric "$SERIES_GETS")")
cold_reqs=$(field requests "$cold")
# Refresh ahead renews a token min(refresh_before = 60 s, lifetime / 2) before
# expiry: each busy user needs one token request per EXPIRES / 2 seconds.
expected=$(awk -v u="$USERS" -v d="$DURATION" -v e="$EXPIRES" 'BEGIN { printf "%d", u * int(d / (e / 2)) }')

log "runs 2 and 3: warm pooled route vs credential route, ${WARM_DURATION} s each"
t0=$(cpu_ticks "$PROXY_PID")
if [[ -n ${PERF:-} ]]; then
    perf record -F 999 -o "$WORK/perf.data" -p "$PROXY_PID" -- sleep "$WARM_DURATION" 2>/dev/null &
    PERF_PID=$!
fi
pooled=$(run_wrk "$WORK/pooled.lua" "$WARM_DURATION")
t1=$(cpu_ticks "$PROXY_PID")
if [[ -n ${PERF:-} ]]; then
    wait "$PERF_PID" || true
    perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40 >"$OUT/connections-perf.txt"
fi
cred=$(run_wrk "$WORK/cred.lua" "$WARM_DURATION")
t2=$(cpu_ticks "$PROXY_PID")
hz=$(getconf CLK_TCK)
us_per() { awk -v t="$1" -v n="$2" -v hz="$hz" 'BEGIN { printf "%.1f", n ? t * 1e6 / hz / n : 0 }'; }
pooled_us=$(us_per $((t1 - t0)) "$(field requests "$pooled")")
cred_us=$(us_per $((t2 - t1)) "$(field requests "$cred")")

mkdir -p "$OUT"
{
    echo "## Per-user connections ($USERS users, $CONNS connections, tokens of ${EXPIRES} s)"
    echo
    echo "- $(nproc) CPUs, $(uname -r); flinks-proxy $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), workers = 1"
    echo
    echo "| run | requests | req/s | p50 µs | p99 µs | non-2xx | errors | proxy CPU µs/req |"
    echo "|---|---|---|---|---|---|---|---|"
    row() { echo "| $1 | $(field requests "$2") | $(($(field requests "$2") / $3)) | $(field p50_us "$2") | $(field p99_us "$2") | $(field non2xx "$2") | $(field errors "$2") | $4 |"; }
    row "cold start, ${DURATION} s" "$cold" "$DURATION" "$(us_per $((ticks1 - ticks0)) "$cold_reqs")"
    row "pooled route, warm" "$pooled" "$WARM_DURATION" "$pooled_us"
    row "credential route, warm" "$cred" "$WARM_DURATION" "$cred_us"
    echo
    echo "- store reads: $gets; tokens served from the store: $from_store (one read per user not in memory)"
    echo "- token requests (refreshes) in run 1: $refreshes; a refresh-ahead schedule for $USERS busy users needs $expected; ratio $(awk -v r="$refreshes" -v e="$expected" 'BEGIN { printf "%.2f", e ? r / e : 0 }')"
    echo "- proxy RSS with $USERS users cached: $((rss / 1024)) MiB"
    echo "- pooled minus credential route: $(awk -v a="$pooled_us" -v b="$cred_us" 'BEGIN { printf "%.1f", a - b }') µs of CPU per request"
} | tee "$OUT/connections.md"
