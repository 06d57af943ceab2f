-- Issue 15: what another process (a CLI command) changed reaches the
-- serving process through a change log it polls, and per-state counts are
-- kept by triggers so /status never scans the table.

-- One row per change to a connection, in commit order. The serving
-- process reads `seq > last seen` every second and prunes old rows.
-- Lease-only updates are not logged. `holder` is the lease holder that
-- committed a refresh (a process ignores its own).
CREATE TABLE connection_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    pool TEXT NOT NULL,
    id TEXT NOT NULL,
    event TEXT NOT NULL,
    holder TEXT NOT NULL DEFAULT ''
);

CREATE TRIGGER connections_log_insert AFTER INSERT ON connections BEGIN
    INSERT INTO connection_changes (pool, id, event) VALUES (NEW.pool, NEW.id, 'created');
END;

CREATE TRIGGER connections_log_delete AFTER DELETE ON connections BEGIN
    INSERT INTO connection_changes (pool, id, event) VALUES (OLD.pool, OLD.id, 'deleted');
END;

CREATE TRIGGER connections_log_update AFTER UPDATE ON connections
WHEN NEW.state IS NOT OLD.state
  OR NEW.authorized_at IS NOT OLD.authorized_at
  OR NEW.access_token IS NOT OLD.access_token
  OR NEW.refresh_token IS NOT OLD.refresh_token
BEGIN
    INSERT INTO connection_changes (pool, id, event, holder) VALUES (NEW.pool, NEW.id,
        CASE
            WHEN NEW.state IS NOT OLD.state AND NEW.state = 'needs_reauthorization'
                THEN 'needs_reauthorization'
            WHEN NEW.authorized_at IS NOT OLD.authorized_at OR NEW.state IS NOT OLD.state
                THEN 'reauthorized'
            ELSE 'refreshed'
        END,
        CASE
            WHEN NEW.state IS OLD.state AND NEW.authorized_at IS OLD.authorized_at
                THEN COALESCE(OLD.lease_owner, '')
            ELSE ''
        END);
END;

-- Connections per pool and state, kept by triggers.
CREATE TABLE connection_counts (
    pool TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (pool, state)
);

INSERT INTO connection_counts (pool, state, n)
    SELECT pool, state, COUNT(*) FROM connections GROUP BY pool, state;

CREATE TRIGGER connections_count_insert AFTER INSERT ON connections BEGIN
    INSERT INTO connection_counts (pool, state, n) VALUES (NEW.pool, NEW.state, 1)
        ON CONFLICT (pool, state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER connections_count_delete AFTER DELETE ON connections BEGIN
    UPDATE connection_counts SET n = n - 1 WHERE pool = OLD.pool AND state = OLD.state;
END;

CREATE TRIGGER connections_count_update AFTER UPDATE OF state, pool ON connections
WHEN NEW.state IS NOT OLD.state OR NEW.pool IS NOT OLD.pool
BEGIN
    UPDATE connection_counts SET n = n - 1 WHERE pool = OLD.pool AND state = OLD.state;
    INSERT INTO connection_counts (pool, state, n) VALUES (NEW.pool, NEW.state, 1)
        ON CONFLICT (pool, state) DO UPDATE SET n = n + 1;
END;
