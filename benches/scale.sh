#!/usr/bin/env bash
# A million connections per store (issue 20): ROWS sealed connections in
# one PostgreSQL, two replicas, Zipf-distributed traffic over the users.
#
#     benches/scale.sh                          # about 3 minutes
#     ROWS=100000 DURATION=20 benches/scale.sh  # quick check
#
# What it does (loopback only):
#   - builds `cargo build --release` (SKIP_BUILD=1 uses the existing binary);
#   - a throwaway PostgreSQL cluster (benches/common.sh; fsync off) with two
#     databases migrated by the proxy itself: `small` (SMALL_ROWS rows) and
#     `bench` (ROWS rows);
#   - the sandbox with ROWS stateless bench users (`sandbox --bench-users`:
#     tokens known by their form, src/sandbox/bench.rs), so the rows can be
#     made without it: `flinks-proxy bench-rows` seals each row's refresh
#     and access token under the store key exactly as the store does and
#     writes COPY text, piped into `psql \copy` with the row triggers off
#     (session_replication_role = replica: no NOTIFY, no webhook event and
#     no count update per row); the per-state counts are then set once, as
#     migration 0002 does, and the table is vacuumed and analyzed. Every
#     EXPIRED_EVERY-th user's access token has expired (its first request
#     refreshes); the others' are valid VALID_FOR s;
#   - startup (RUNS times on each database, median): process start to
#     /healthz answering, to /readyz ready, to /status showing every row in
#     the per-state counts; RSS then; the counts query's mean duration
#     (both replicas, over the load below);
#   - two replicas (`workers = 1`, cache_size = ROWS) on `bench`, one wrk
#     each (CONNS / 2 connections, -t1) choosing X-Flinks-Connection per
#     request by Zipf (exponent ZIPF_S, fixed seeds) over ranks 1..ROWS-COLD
#     (rank k is user u(k-1)); WARMUP s, then DURATION s measured: store
#     operations per proxied request (flinks_proxy_store_operations_total,
#     both replicas, by operation), first reads, refreshes, WAL bytes;
#   - RSS growth per cached connection (RSS after the load minus RSS after
#     startup, over /status's cache_size);
#   - cold users: the COLD users u(ROWS-COLD)..u(ROWS-1), never requested
#     before, one request each on replica 1 (sequential, one keep-alive
#     connection, curl), then the same requests again (warm): p50/p99.
# Writes bench-results/scale.md.
#
# Settings: ROWS (1000000), SMALL_ROWS (1000), DURATION (60), WARMUP (20),
# CONNS (32), ZIPF_S (1.0), SEED (20), COLD (1000), EXPIRED_EVERY (10),
# VALID_FOR (3600), EXPIRES (300: the sandbox's tokens, as Flinks'),
# RUNS (3), PORT_BASE (24000), OUT (bench-results), SKIP_BUILD, BIN.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROWS=${ROWS:-1000000}
SMALL_ROWS=${SMALL_ROWS:-1000}
DURATION=${DURATION:-60}
WARMUP=${WARMUP:-20}
CONNS=${CONNS:-32}
ZIPF_S=${ZIPF_S:-1.0}
SEED=${SEED:-20}
COLD=${COLD:-1000}
EXPIRED_EVERY=${EXPIRED_EVERY:-10}
VALID_FOR=${VALID_FOR:-3600}
EXPIRES=${EXPIRES:-300}
RUNS=${RUNS:-3}
PORT_BASE=${PORT_BASE:-24000}
OUT=${OUT:-$ROOT/bench-results}
WORK="$OUT/work-scale"
BIN=${BIN:-$ROOT/target/release/flinks-proxy}
PIDS=()
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

log() { printf '[scale] %s\n' "$*" >&2; }
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pg_stop
}
trap cleanup EXIT

command -v wrk >/dev/null || { log "wrk is needed (apt-get install -y wrk)"; exit 1; }
command -v jq >/dev/null || { log "jq is needed (apt-get install -y jq)"; exit 1; }
((COLD < ROWS)) || { log "COLD must be below ROWS"; exit 1; }
[[ ${SKIP_BUILD:-} == 1 ]] || (cd "$ROOT" && cargo build --release)
rm -rf "$WORK"
mkdir -p "$WORK"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
admin() { echo "http://127.0.0.1:$((PORT_BASE + 2 * $1 + 1))"; }
proxy() { echo "http://127.0.0.1:$((PORT_BASE + 2 * $1))"; }
ratio() { awk -v a="$1" -v b="$2" -v f="${3:-%.3f}" 'BEGIN { printf f, b ? a / b : 0 }'; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

log "PostgreSQL cluster on port $((PORT_BASE + 99))"
pg_start $((PORT_BASE + 99)) -c shared_buffers=256MB -c max_wal_size=4GB -c shared_preload_libraries=pg_stat_statements
pg_createdb small
# Every statement PostgreSQL runs for the replicas, counted on its side too.
pg_sql bench -c "CREATE EXTENSION pg_stat_statements"
sandbox_start --bench-users "$ROWS" --expires-in "$EXPIRES"
KEY=$("$BIN" keygen)

# write_config REPLICA DB: replica REPLICA's proxy.toml on database DB.
write_config() {
    cat >"$WORK/proxy$1.toml" <<EOF
[server]
listen = "127.0.0.1:$((PORT_BASE + 2 * $1))"
workers = 1
[admin]
listen = "127.0.0.1:$((PORT_BASE + 2 * $1 + 1))"
[log]
level = "warn"
[store]
url = "$(pg_url "$2")"
key = "$KEY"
[connections.users]
token_url = "$TOKEN_URL"
client_id = "demo-client"
client_secret = "demo-secret"
redirect_uri = "https://example.com/callback"
cache_size = $ROWS
[routes.pooled]
path_prefix = "/"
upstream = "$API_URL"
connections = "users"
# A stored token the sandbox does not take shows as a non-2xx, not a retry.
reauth_on = []
EOF
}

# start_replica REPLICA: starts it (its pid in REPLICA_PID), returns when
# /healthz answers.
start_replica() {
    "$BIN" --config "$WORK/proxy$1.toml" >>"$WORK/proxy$1.out" 2>>"$WORK/proxy$1.err" &
    REPLICA_PID=$!
    PIDS+=("$REPLICA_PID")
    wait_http "$(admin "$1")/healthz"
}
stop_replica() { kill "$1"; wait "$1" 2>/dev/null || true; }

# The proxy creates the schema and the key canary itself.
for db in small bench; do
    write_config 0 "$db"
    start_replica 0
    wait_http "$(admin 0)/readyz"
    stop_replica "$REPLICA_PID"
done

# seed DB FIRST COUNT: bench-rows into DB's connections, triggers off.
COPY_COLUMNS="pool, id, sub, state, created_at, authorized_at, last_refresh_at, access_token_expires_at, refresh_token, access_token"
seed() {
    FLINKS_PROXY_STORE_KEY=$KEY "$BIN" bench-rows --first "$2" --rows "$3" \
        --expired-every "$EXPIRED_EVERY" --valid-for "$VALID_FOR" |
        pg_sql "$1" -c "SET session_replication_role = replica" -c "\\copy connections ($COPY_COLUMNS) FROM pstdin"
    pg_sql "$1" -c "INSERT INTO connection_counts (pool, state, n)
        SELECT pool, state, COUNT(*) FROM connections GROUP BY pool, state
        ON CONFLICT (pool, state) DO UPDATE SET n = EXCLUDED.n"
}
log "seeding $SMALL_ROWS rows into small"
seed small 0 "$SMALL_ROWS"
pg_sql small -c "VACUUM ANALYZE connections"
log "seeding $ROWS rows into bench"
t0=$(now_ms)
seed bench 0 "$ROWS"
t1=$(now_ms)
pg_sql bench -c "VACUUM ANALYZE connections"
t2=$(now_ms)
SEED_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
VACUUM_S=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
read -r TOTAL_BYTES HEAP_BYTES INDEX_BYTES <<<"$(pg_sql bench -At -F ' ' -c "SELECT pg_total_relation_size('connections'),
    pg_relation_size('connections'), pg_indexes_size('connections')")"
# What `flinks-proxy connections list` without --pool runs (Store::pools).
DISTINCT_MS=$(pg_sql bench -At -c "EXPLAIN (ANALYZE, FORMAT JSON) SELECT DISTINCT pool FROM connections ORDER BY pool" |
    jq '.[0]["Execution Time"]')
log "seeded in $SEED_S s (vacuum analyze $VACUUM_S s); $((TOTAL_BYTES / ROWS)) bytes per row"

# alive PID DEADLINE_MS: a short pause, or stop the bench if PID died or
# the deadline passed.
alive() {
    kill -0 "$1" 2>/dev/null || { log "the proxy exited: $(tail -3 "$WORK/proxy0.err")"; exit 1; }
    (($(now_ms) < $2)) || { log "the proxy did not get ready within 60 s"; exit 1; }
    sleep 0.005
}
# startup DB ROWS: one start of replica 0 on DB; prints "healthz_ms
# readyz_ms counts_ms rss_kib".
startup() {
    write_config 0 "$1"
    local t0 th tr tc rss
    t0=$(now_ms)
    "$BIN" --config "$WORK/proxy0.toml" >>"$WORK/proxy0.out" 2>>"$WORK/proxy0.err" &
    local pid=$!
    PIDS+=("$pid")
    local deadline=$((t0 + 60000))
    until curl -sf -o /dev/null "$(admin 0)/healthz"; do alive "$pid" "$deadline"; done
    th=$(now_ms)
    until curl -sf -o /dev/null "$(admin 0)/readyz"; do alive "$pid" "$deadline"; done
    tr=$(now_ms)
    until [[ $(curl -s "$(admin 0)/status" | jq '.pools.users.connections.active') == "$2" ]]; do
        alive "$pid" "$deadline"
    done
    tc=$(now_ms)
    rss=$(rss_kb "$pid")
    stop_replica "$pid"
    echo "$((th - t0)) $((tr - t0)) $((tc - t0)) $rss"
}
for db in small bench; do
    rows=$SMALL_ROWS
    [[ $db == bench ]] && rows=$ROWS
    log "startup on $db ($rows rows), $RUNS runs"
    for _ in $(seq 1 "$RUNS"); do startup "$db" "$rows"; done >"$WORK/startup-$db.txt"
done
# col FILE N: the median of column N.
col() { awk -v n="$2" '{ print $n }' "$1" | median; }

log "two replicas on bench"
REPLICA_PIDS=()
for i in 0 1; do
    write_config "$i" bench
    start_replica "$i"
    REPLICA_PIDS+=("$REPLICA_PID")
    wait_http "$(admin "$i")/readyz"
done
sleep 1
RSS0=("$(rss_kb "${REPLICA_PIDS[0]}")" "$(rss_kb "${REPLICA_PIDS[1]}")")

ZIPF_N=$((ROWS - COLD))
cat >"$WORK/zipf.lua" <<EOF
-- Zipf($ZIPF_S) over ranks 1..$ZIPF_N (rank k is user u(k-1)), by
-- binary search in the cumulative distribution; a fixed seed per wrk.
local n, s = $ZIPF_N, $ZIPF_S
local cdf, sum = {}, 0
for k = 1, n do sum = sum + 1 / k ^ s; cdf[k] = sum end
for k = 1, n do cdf[k] = cdf[k] / sum end
math.randomseed(tonumber(os.getenv("ZIPF_SEED") or "1"))
local function pick()
    local u, lo, hi = math.random(), 1, n
    while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if cdf[mid] < u then lo = mid + 1 else hi = mid end
    end
    return lo
end
request = function()
    return wrk.format("GET", "/status/200", { ["X-Flinks-Connection"] = "u" .. (pick() - 1) })
end
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("RESULT requests=%d non2xx=%d errors=%d p50_us=%d p99_us=%d\n",
        summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(99)))
end
EOF

# snapshot FILE: both replicas' counters of interest, summed, "name value".
snapshot() {
    for i in 0 1; do curl -s "$(admin "$i")/metrics"; done | awk '
        /^flinks_proxy_store_operations_total\{/ { match($1, /op="[^"]*"/); ops[substr($1, RSTART + 4, RLENGTH - 5)] += $2; all += $2 }
        /^flinks_proxy_connection_tokens_total\{/ { match($1, /source="[^"]*"/); src[substr($1, RSTART + 8, RLENGTH - 9)] += $2 }
        /^flinks_proxy_connection_token_requests_total\{/ && /outcome="success"/ { refreshes += $2 }
        END {
            for (o in ops) printf "op_%s %d\n", o, ops[o]
            for (x in src) printf "source_%s %d\n", x, src[x]
            printf "ops %d\nrefreshes %d\n", all, refreshes
        }' >"$1"
    pg_sql bench -At -c "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn" | awk '{ printf "wal %d\n", $1 }' >>"$1"
    # Users in the replicas' memory: with cache_size = ROWS none leave, so
    # the growth is the number of first reads.
    for i in 0 1; do curl -s "$(admin "$i")/status" | jq '.pools.users.cache_size'; done |
        awk '{ s += $1 } END { printf "cached %d\n", s }' >>"$1"
}
# cpu_ticks PID...: utime + stime of the processes, in clock ticks.
cpu_ticks() { for p in "$@"; do awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat"; done | awk '{ s += $1 } END { print s }'; }
# The cluster's processes: the postmaster and its children (the proxies'
# connections are long-lived, so their CPU stays counted).
pg_pids() {
    local pm
    pm=$(head -1 "$WORK/pg/data/postmaster.pid")
    # shellcheck disable=SC2046
    echo "$pm" $(ps -o pid= --ppid "$pm")
}
# delta NAME: the measured run's increase of NAME.
delta() {
    awk -v k="$1" '$1 == k { if (FNR == NR) b = $2; else a = $2 } END { printf "%d", a - b }' \
        "$WORK/before.txt" "$WORK/after.txt"
}
run_load() {
    local pids=()
    for i in 0 1; do
        ZIPF_SEED=$((SEED + i)) wrk -t1 -c$((CONNS / 2)) -d"$1s" --timeout 5s -s "$WORK/zipf.lua" \
            "$(proxy "$i")" | grep '^RESULT' >"$WORK/wrk-$2-$i.txt" &
        pids+=("$!")
    done
    wait "${pids[@]}"
}
log "load: Zipf over $ZIPF_N users, $CONNS connections, ${WARMUP} s warm-up"
run_load "$WARMUP" warmup
snapshot "$WORK/before.txt"
# shellcheck disable=SC2046
read -r PROXY_T0 PG_T0 <<<"$(cpu_ticks "${REPLICA_PIDS[@]}") $(cpu_ticks $(pg_pids))"
pg_sql bench -At -c "SELECT pg_stat_statements_reset()" >/dev/null
log "load: ${DURATION} s measured"
run_load "$DURATION" measured
# Statements on `bench` during the run (this script's own left out), and
# those that read the change feed (connection_changes), if any.
read -r PG_STATEMENTS PG_FEED_READS <<<"$(pg_sql bench -At -F ' ' -c "SELECT COALESCE(SUM(calls), 0),
    COALESCE(SUM(calls) FILTER (WHERE query LIKE '%FROM connection_changes%' AND query NOT LIKE 'DELETE%'), 0)
    FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'bench')
    AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_current_wal_lsn%'")"
# shellcheck disable=SC2046
read -r PROXY_T1 PG_T1 <<<"$(cpu_ticks "${REPLICA_PIDS[@]}") $(cpu_ticks $(pg_pids))"
snapshot "$WORK/after.txt"
sleep 1
RSS1=("$(rss_kb "${REPLICA_PIDS[0]}")" "$(rss_kb "${REPLICA_PIDS[1]}")")
CACHED=("$(curl -s "$(admin 0)/status" | jq '.pools.users.cache_size')" "$(curl -s "$(admin 1)/status" | jq '.pools.users.cache_size')")
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" "$WORK"/wrk-measured-*.txt | awk '{ s += $1 } END { printf "%d", s }'; }
REQUESTS=$(field requests)
BAD=$(($(field non2xx) + $(field errors)))
P99=$(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' "$WORK"/wrk-measured-*.txt | sort -n | tail -1)
P50=$(sed -n 's/.* p50_us=\([0-9]*\).*/\1/p' "$WORK"/wrk-measured-*.txt | sort -n | tail -1)

HZ=$(getconf CLK_TCK)
us_per() { awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN { printf "%.1f", n ? t * 1e6 / hz / n : 0 }'; }
FIRST_READS=$(delta cached)
REQUEST_OPS=$(($(delta op_get) + $(delta op_lease) + $(delta op_commit) + $(delta op_release)))
REFRESH_WRITES=$(($(delta op_lease) + $(delta op_commit) + $(delta op_release)))
# Cached connections evicted and read again also count as first reads
# (the cache count falls): a re-read count below 0 is 0.
REREADS=$(($(delta op_get) - FIRST_READS))
((REREADS > 0)) || REREADS=0
BACKGROUND_OPS=$(($(delta ops) - REQUEST_OPS))
COUNTS_MS=$(for i in 0 1; do curl -s "$(admin "$i")/metrics"; done | awk '
    /^flinks_proxy_store_operation_duration_seconds_sum\{op="counts"/ { s += $2 }
    /^flinks_proxy_store_operation_duration_seconds_count\{op="counts"/ { n += $2 }
    END { printf "%.2f", n ? s / n * 1000 : 0 }')

# op_latency OP: "mean_ms p99_le_ms" of a store operation over the whole
# run (both replicas; the p99 as the histogram bucket bound it falls under).
op_latency() {
    for i in 0 1; do curl -s "$(admin "$i")/metrics"; done | awk -v op="op=\"$1\"" '
        index($0, "flinks_proxy_store_operation_duration_seconds_bucket{") == 1 && index($0, op) {
            match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); b[le] += $2; les[le] = 1 }
        index($0, "flinks_proxy_store_operation_duration_seconds_sum{") == 1 && index($0, op) { s += $2 }
        index($0, "flinks_proxy_store_operation_duration_seconds_count{") == 1 && index($0, op) { n += $2 }
        END {
            p = "?"; best = 1e9
            for (le in les) if (le != "+Inf" && b[le] >= 0.99 * n && le + 0 < best) { best = le + 0; p = sprintf("%g", le * 1000) }
            printf "%.2f %s", n ? s / n * 1000 : 0, p
        }'
}
read -r GET_MEAN GET_P99 <<<"$(op_latency get)"

# Cold users on replica 1: one curl, one keep-alive connection, a request each.
cold_config() {
    for u in $(seq $((ROWS - COLD)) $((ROWS - 1))); do
        ((u == ROWS - COLD)) || echo next
        printf 'url = "%s/status/200"\nheader = "X-Flinks-Connection: u%d"\noutput = "/dev/null"\nwrite-out = "%d %%{http_code} %%{time_total}\\n"\n' \
            "$(proxy 1)" "$u" "$u"
    done
}
cold_config >"$WORK/cold.curl"
log "cold users: $COLD first requests on replica 1, then the same again"
curl -s -K "$WORK/cold.curl" >"$WORK/cold.txt"
curl -s -K "$WORK/cold.curl" >"$WORK/warm.txt"
cold_bad=$(awk '$2 != 200' "$WORK/cold.txt" "$WORK/warm.txt" | wc -l)
# times CLASS FILE: seconds of the valid-token (or expired-token) users.
class_times() { awk -v e="$EXPIRED_EVERY" -v c="$1" '(e > 0 && $1 % e == 0) == (c == "expired") { print $3 }' "$2"; }

per_conn() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.0f", n ? (b - a) * 1024 / n : 0 }'; }
commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
mkdir -p "$OUT"
{
    echo "## A million connections per store ($ROWS rows, 2 replicas, Zipf s=$ZIPF_S)"
    echo
    echo "- $(nproc) CPUs, $(uname -r), PostgreSQL $("$PG_BIN/postgres" --version | awk '{ print $3 }') (fsync off); flinks-proxy $commit, workers = 1, cache_size = $ROWS"
    echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| seeding $ROWS rows (bench-rows → \\copy, triggers off) | $SEED_S s ($(ratio "$ROWS" "$SEED_S" %.0f) rows/s); VACUUM ANALYZE $VACUUM_S s |"
    echo "| bytes per row: table + indexes (heap, indexes) | $((TOTAL_BYTES / ROWS)) ($((HEAP_BYTES / ROWS)), $((INDEX_BYTES / ROWS))) |"
    for db in small bench; do
        rows=$SMALL_ROWS
        [[ $db == bench ]] && rows=$ROWS
        f="$WORK/startup-$db.txt"
        echo "| startup with $rows rows: /healthz, /readyz, counts in /status (ms, median of $RUNS) | $(col "$f" 1), $(col "$f" 2), $(col "$f" 3) |"
        echo "| RSS at start with $rows rows | $(($(col "$f" 4) / 1024)) MiB |"
    done
    echo "| the per-state counts query (connection_counts), mean over the run | $COUNTS_MS ms |"
    echo "| \`connections list\` without --pool: SELECT DISTINCT pool over $ROWS rows | $DISTINCT_MS ms |"
    echo "| cold user's first request, valid stored token: p50 / p99 (ms) | $(class_times valid "$WORK/cold.txt" | pct 50) / $(class_times valid "$WORK/cold.txt" | pct 99) |"
    echo "| cold user's first request, expired stored token (a refresh): p50 / p99 (ms) | $(class_times expired "$WORK/cold.txt" | pct 50) / $(class_times expired "$WORK/cold.txt" | pct 99) |"
    echo "| the same users again, warm: p50 / p99 (ms) | $(awk '{ print $3 }' "$WORK/warm.txt" | pct 50) / $(awk '{ print $3 }' "$WORK/warm.txt" | pct 99) |"
    echo "| Zipf load, ${DURATION} s after ${WARMUP} s: requests, req/s, p50 / p99 (µs, worse replica), non-2xx + errors | $REQUESTS, $((REQUESTS / DURATION)), $P50 / $P99, $BAD |"
    echo "| CPU per proxied request: both replicas / PostgreSQL (µs) | $(us_per $((PROXY_T1 - PROXY_T0)) "$REQUESTS") / $(us_per $((PG_T1 - PG_T0)) "$REQUESTS") |"
    echo "| PostgreSQL CPU (all its processes) per statement it ran (µs) | $(us_per $((PG_T1 - PG_T0)) "$PG_STATEMENTS") |"
    echo "| store reads (get) as the replicas time them, incl. waiting for one of the pool's connections: mean, p99 ≤ (ms) | $GET_MEAN, $GET_P99 |"
    echo "| store operations per proxied request on the request path (get, lease, commit, release) | $(ratio "$REQUEST_OPS" "$REQUESTS") |"
    echo "| of which first reads of users not cached yet | $(ratio "$FIRST_READS" "$REQUESTS") |"
    echo "| **warm: re-reads of cached users (gets minus first reads), per request** | **$(ratio "$REREADS" "$REQUESTS")** |"
    echo "| refresh writes (lease, commit, release) per request: first requests of users whose stored token had expired, and refreshes ahead | $(ratio "$REFRESH_WRITES" "$REQUESTS") |"
    echo "| statements PostgreSQL ran for the replicas (pg_stat_statements, BEGIN/COMMIT included), per proxied request | $(ratio "$PG_STATEMENTS" "$REQUESTS") |"
    echo "| change feed reads, per replica per second | $(ratio "$PG_FEED_READS" $((2 * DURATION)) %.1f) |"
    echo "| background store operations (all but those four: counts, keep-alive gauge, webhook queue), per replica per second | $(ratio "$BACKGROUND_OPS" $((2 * DURATION)) %.1f) |"
    echo "| store operations by op in the measured run (both replicas) | $(for o in $(awk '$1 ~ /^op_/ { sub(/^op_/, "", $1); print $1 }' "$WORK/after.txt" | sort); do d=$(delta "op_$o"); ((d > 0)) && printf '%s %d, ' "$o" "$d"; done | sed 's/, $//') |"
    echo "| refreshes (token requests) in the measured run, per second | $(delta refreshes), $(ratio "$(delta refreshes)" "$DURATION" %.1f) |"
    echo "| row updates of connections (all runs), of which HOT | $(pg_sql bench -At -F ', ' -c "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'connections'") |"
    echo "| WAL bytes per refresh | $(ratio "$(delta wal)" "$(delta refreshes)" %.0f) |"
    for i in 0 1; do
        echo "| replica $i: RSS after startup → after the load, cached connections, bytes per cached connection | $((RSS0[i] / 1024)) → $((RSS1[i] / 1024)) MiB, ${CACHED[i]}, $(per_conn "${RSS0[i]}" "${RSS1[i]}" "${CACHED[i]}") |"
    done
    echo
    cold99=$(class_times valid "$WORK/cold.txt" | pct 99)
    warm99=$(awk '{ print $3 }' "$WORK/warm.txt" | pct 99)
    small=$(col "$WORK/startup-small.txt" 3)
    big=$(col "$WORK/startup-bench.txt" 3)
    verdict() { if awk "BEGIN { exit !($1) }"; then echo met; else echo MISSED; fi; }
    echo "- target, startup and RSS do not grow with the rows: counts in /status after ${small} ms with $SMALL_ROWS rows, ${big} ms with $ROWS; RSS $(($(col "$WORK/startup-small.txt" 4) / 1024)) and $(($(col "$WORK/startup-bench.txt" 4) / 1024)) MiB"
    echo "- target, a cold user's first request p99 ≤ 5 ms over the warm path: ${cold99} ms against ${warm99} ms warm, $(awk -v a="$cold99" -v b="$warm99" 'BEGIN { printf "%+.1f", a - b }') ms — $(verdict "$cold99 - $warm99 <= 5")"
    warm_ops=$(ratio "$REREADS" "$REQUESTS")
    echo "- target, 0 store round trips per warm request: $warm_ops re-reads per request — $(verdict "$warm_ops == 0") (refreshes apart: $(ratio "$REFRESH_WRITES" "$REQUESTS") writes per request, $(delta refreshes) refreshes)"
    bpc=$(per_conn "${RSS0[1]}" "${RSS1[1]}" "${CACHED[1]}")
    echo "- target, ≤ 1 KiB per cached connection: $(per_conn "${RSS0[0]}" "${RSS1[0]}" "${CACHED[0]}") and $bpc bytes — $(verdict "$bpc <= 1024 && $(per_conn "${RSS0[0]}" "${RSS1[0]}" "${CACHED[0]}") <= 1024")"
    echo "- cold and warm requests: $COLD users u$((ROWS - COLD))..u$((ROWS - 1)) (outside the Zipf ranks), sequential on replica 1 after the load, one keep-alive connection; non-200: $cold_bad"
} | tee "$OUT/scale.md"
