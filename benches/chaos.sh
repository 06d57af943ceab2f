#!/usr/bin/env bash
# The fault-injection suite of issue 15 (tests/chaos.rs) for as long as
# asked: random seeds on SQLite (one proxy) and on PostgreSQL (two
# replicas), side by side, until the time is up. Prints every seed with its
# steps, invariant checks and findings, and the totals; exits non-zero on a
# finding (the failing seeds' step lists are printed; rerun one with
# CHAOS_SEED=N cargo test --test chaos).
#
#   benches/chaos.sh 30m            # CHAOS_DURATION, humantime (default 5m)
#   CHAOS_STEPS=20 benches/chaos.sh 1h
#
# Needs the PostgreSQL server binaries (initdb, pg_ctl), as `cargo test` does.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-${CHAOS_DURATION:-5m}}"
steps="${CHAOS_STEPS:-16}"
echo "chaos: random seeds for $duration, $steps steps each"
cargo test --test chaos --no-run
log="$(mktemp -t chaos.XXXXXX.log)"
set +e
CHAOS_DURATION="$duration" CHAOS_STEPS="$steps" \
  cargo test --test chaos seeded_faults -- --nocapture --test-threads 2 2>&1 |
  tee "$log" |
  grep --line-buffered -E '^(chaos |seed |steps:|findings:|invariant | *[0-9]+\. |test |thread )'
status=${PIPESTATUS[0]}
echo "chaos: exit $status; full output in $log"
exit "$status"
