-- Issue 18: lifecycle events (CONNECT.md, "Lifecycle events"). Each event
-- is written by a trigger, in the same transaction as the change it
-- reports, to an outbox the deliverer drains: a kill -9 right after a
-- change loses nothing, and every writer (the proxy, the CLI) is covered.
-- `data` is the non-secret columns of the row as JSON, never a token.
-- Times are Unix milliseconds.

-- A connection's transient refresh failures: since when (cleared by a
-- success), and whether `connection.refresh_failing` was reported.
ALTER TABLE connections ADD COLUMN failing_since INTEGER;
ALTER TABLE connections ADD COLUMN failing_reported INTEGER NOT NULL DEFAULT 0;

CREATE TABLE webhook_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The `webhook-id`, the same on every attempt.
    id TEXT NOT NULL UNIQUE DEFAULT ('msg_' || lower(hex(randomblob(16)))),
    type TEXT NOT NULL,
    -- What order is kept for: `pool/id` of a connection, `session/id`.
    subject TEXT NOT NULL,
    data TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    -- max_age counts from here: occurred_at, or a manual retry.
    attempts_since INTEGER,
    -- pending | delivered | failed (rejected or expired)
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    outcome TEXT,
    finished_at INTEGER,
    -- A delivery in progress: who holds it and until when.
    lease_owner TEXT,
    lease_until INTEGER
);

CREATE INDEX webhook_events_pending ON webhook_events (state, subject, seq);
CREATE INDEX webhook_events_finished ON webhook_events (state, finished_at);

CREATE TRIGGER webhooks_connection_insert AFTER INSERT ON connections
WHEN NEW.pool NOT LIKE 'credential:%'
BEGIN
    INSERT INTO webhook_events (type, subject, data, occurred_at, next_attempt_at)
    VALUES ('connection.created', NEW.pool || '/' || NEW.id,
        json_object('pool', NEW.pool, 'id', NEW.id, 'sub', NEW.sub, 'state', NEW.state,
            'last_error', NEW.last_error, 'last_error_description', NEW.last_error_description,
            'last_error_at', NEW.last_error_at, 'created_at', NEW.created_at,
            'authorized_at', NEW.authorized_at, 'last_refresh_at', NEW.last_refresh_at,
            'access_token_expires_at', NEW.access_token_expires_at),
        CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 0);
END;

CREATE TRIGGER webhooks_connection_delete AFTER DELETE ON connections
WHEN OLD.pool NOT LIKE 'credential:%'
BEGIN
    INSERT INTO webhook_events (type, subject, data, occurred_at, next_attempt_at)
    VALUES ('connection.deleted', OLD.pool || '/' || OLD.id,
        json_object('pool', OLD.pool, 'id', OLD.id, 'sub', OLD.sub, 'state', OLD.state,
            'last_error', OLD.last_error, 'last_error_description', OLD.last_error_description,
            'last_error_at', OLD.last_error_at, 'created_at', OLD.created_at,
            'authorized_at', OLD.authorized_at, 'last_refresh_at', OLD.last_refresh_at,
            'access_token_expires_at', OLD.access_token_expires_at),
        CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 0);
END;

-- One event per transition: to needs_reauthorization; authorized again;
-- transient failures reported; the first success after them (or after
-- needs_reauthorization, when a refresh that was in flight proves the
-- grant good).
CREATE TRIGGER webhooks_connection_update AFTER UPDATE ON connections
WHEN NEW.pool NOT LIKE 'credential:%' AND (
       (NEW.state IS NOT OLD.state AND NEW.state = 'needs_reauthorization')
    OR NEW.authorized_at IS NOT OLD.authorized_at
    OR (NEW.state IS NOT OLD.state AND NEW.state = 'active')
    OR (NEW.failing_reported = 1 AND OLD.failing_reported = 0)
    OR (NEW.failing_reported = 0 AND OLD.failing_reported = 1 AND NEW.state = 'active'))
BEGIN
    INSERT INTO webhook_events (type, subject, data, occurred_at, next_attempt_at)
    VALUES (
        CASE
            WHEN NEW.state IS NOT OLD.state AND NEW.state = 'needs_reauthorization'
                THEN 'connection.reauthorization_required'
            WHEN NEW.authorized_at IS NOT OLD.authorized_at
                THEN 'connection.reauthorized'
            WHEN NEW.failing_reported = 1 AND OLD.failing_reported = 0
                THEN 'connection.refresh_failing'
            ELSE 'connection.recovered'
        END,
        NEW.pool || '/' || NEW.id,
        json_object('pool', NEW.pool, 'id', NEW.id, 'sub', NEW.sub, 'state', NEW.state,
            'last_error', NEW.last_error, 'last_error_description', NEW.last_error_description,
            'last_error_at', NEW.last_error_at, 'created_at', NEW.created_at,
            'authorized_at', NEW.authorized_at, 'last_refresh_at', NEW.last_refresh_at,
            'access_token_expires_at', NEW.access_token_expires_at),
        CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 0);
END;

CREATE TRIGGER webhooks_session_failed AFTER UPDATE OF status ON connect_sessions
WHEN NEW.status = 'failed' AND OLD.status IS NOT 'failed'
BEGIN
    INSERT INTO webhook_events (type, subject, data, occurred_at, next_attempt_at)
    VALUES ('connect_session.failed', 'session/' || NEW.id,
        json_object('session_id', NEW.id, 'pool', NEW.pool, 'status', NEW.status,
            'connection_id', NEW.connection_id, 'redirect_to', NEW.redirect_to,
            'error', NEW.error, 'error_description', NEW.error_description,
            'created_at', NEW.created_at, 'expires_at', NEW.expires_at,
            'finished_at', NEW.finished_at),
        CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 0);
END;
