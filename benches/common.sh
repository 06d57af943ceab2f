# Shell shared by the benches that run a throwaway PostgreSQL cluster and
# the sandbox (replicas.sh, scale.sh). Sourced, not run. The caller sets
# WORK (a scratch folder), BIN (the flinks-proxy binary) and PIDS (an
# array of processes to stop on exit), and defines log().
# shellcheck shell=bash

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)

# Runs a PostgreSQL tool as `postgres` when root (initdb refuses root).
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# pg_start PORT [server options...]: a cluster in $WORK/pg on
# 127.0.0.1:PORT (socket in $WORK/pg), superuser postgres with password
# `bench`, fsync off; a database `bench`.
pg_start() {
    local port=$1
    shift
    [[ -n $PG_BIN ]] || { log "PostgreSQL not found: apt-get install -y postgresql"; exit 1; }
    mkdir -p "$WORK/pg"
    echo bench >"$WORK/pg/pw"
    [[ $(id -u) -eq 0 ]] && chown -R postgres:postgres "$WORK/pg"
    as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --pwfile "$WORK/pg/pw" --no-sync -E UTF8 >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
        -o "-p $port -h 127.0.0.1 -k $WORK/pg -c fsync=off -c max_connections=200 $*" start >/dev/null
    PG_PORT=$port
    pg_createdb bench
}

# pg_createdb NAME: another database in the cluster.
pg_createdb() { PGPASSWORD=bench "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$1"; }

# pg_sql DB ARGS...: psql on database DB (quiet, stops at the first error).
pg_sql() {
    local db=$1
    shift
    PGPASSWORD=bench "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

# pg_url DB: the store URL of database DB.
pg_url() { echo "postgres://postgres:bench@127.0.0.1:$PG_PORT/$1"; }

# Stops the cluster and removes it (call from the caller's EXIT trap).
pg_stop() {
    [[ -d $WORK/pg/data ]] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK/pg"
}

# sandbox_start ARGS...: `flinks-proxy sandbox ARGS` in the background;
# sets TOKEN_URL and API_URL.
sandbox_start() {
    "$BIN" sandbox "$@" >"$WORK/sandbox.out" 2>"$WORK/sandbox.err" &
    PIDS+=("$!")
    for _ in $(seq 1 200); do grep -q '^api_url' "$WORK/sandbox.out" && break; sleep 0.05; done
    TOKEN_URL=$(awk '/^token_url/ { print $2 }' "$WORK/sandbox.out")
    API_URL=$(awk '/^api_url/ { print $2 }' "$WORK/sandbox.out")
    [[ -n $API_URL ]] || { log "the sandbox did not start: $(cat "$WORK/sandbox.err")"; exit 1; }
}

# wait_http URL: until it answers 2xx (20 s at most).
wait_http() {
    for _ in $(seq 1 400); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done
    log "timed out waiting for $1"
    exit 1
}

# pct P: the P-th percentile of seconds on stdin, in milliseconds.
pct() { sort -n | awk -v p="$1" '{ a[NR] = $1 } END { i = int(NR * p / 100); if (i < 1) i = 1; printf "%.1f", a[i] * 1000 }'; }

# rss_kb PID: resident set size in KiB.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
