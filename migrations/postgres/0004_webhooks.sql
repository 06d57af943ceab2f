-- Issue 18: lifecycle events (CONNECT.md, "Lifecycle events"). Each event
-- is written by a trigger, in the same transaction as the change it
-- reports, to an outbox the replicas drain (one delivers each event, by a
-- lease): a kill -9 right after a change loses nothing, and every writer
-- (a replica, the CLI) is covered. `data` is the non-secret columns of the
-- row as JSON, never a token. Times are Unix milliseconds.

-- A connection's transient refresh failures: since when (cleared by a
-- success), and whether `connection.refresh_failing` was reported.
ALTER TABLE connections ADD COLUMN failing_since BIGINT;
ALTER TABLE connections ADD COLUMN failing_reported INTEGER NOT NULL DEFAULT 0;

CREATE TABLE webhook_events (
    seq BIGSERIAL PRIMARY KEY,
    -- The `webhook-id`, the same on every attempt.
    id TEXT NOT NULL UNIQUE DEFAULT ('msg_' || replace(gen_random_uuid()::text, '-', '')),
    type TEXT NOT NULL,
    -- What order is kept for: `pool/id` of a connection, `session/id`.
    subject TEXT NOT NULL,
    data TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    -- max_age counts from here: occurred_at, or a manual retry.
    attempts_since BIGINT,
    -- pending | delivered | failed (rejected or expired)
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    outcome TEXT,
    finished_at BIGINT,
    -- A delivery in progress: who holds it and until when.
    lease_owner TEXT,
    lease_until BIGINT
);

CREATE INDEX webhook_events_pending ON webhook_events (state, subject, seq);
CREATE INDEX webhook_events_finished ON webhook_events (state, finished_at);

CREATE FUNCTION flinks_proxy_connection_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kind TEXT;
    r connections;
BEGIN
    IF TG_OP = 'INSERT' THEN
        kind := 'connection.created';
        r := NEW;
    ELSIF TG_OP = 'DELETE' THEN
        kind := 'connection.deleted';
        r := OLD;
    ELSIF NEW.state <> OLD.state AND NEW.state = 'needs_reauthorization' THEN
        kind := 'connection.reauthorization_required';
        r := NEW;
    ELSIF NEW.authorized_at <> OLD.authorized_at THEN
        kind := 'connection.reauthorized';
        r := NEW;
    ELSIF NEW.state <> OLD.state AND NEW.state = 'active' THEN
        kind := 'connection.recovered';
        r := NEW;
    ELSIF NEW.failing_reported = 1 AND OLD.failing_reported = 0 THEN
        kind := 'connection.refresh_failing';
        r := NEW;
    ELSIF NEW.failing_reported = 0 AND OLD.failing_reported = 1 AND NEW.state = 'active' THEN
        kind := 'connection.recovered';
        r := NEW;
    ELSE
        RETURN NULL;
    END IF;
    IF r.pool LIKE 'credential:%' THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (type, subject, data, occurred_at, next_attempt_at)
    VALUES (kind, r.pool || '/' || r.id,
        json_build_object('pool', r.pool, 'id', r.id, 'sub', r.sub, 'state', r.state,
            'last_error', r.last_error, 'last_error_description', r.last_error_description,
            'last_error_at', r.last_error_at, 'created_at', r.created_at,
            'authorized_at', r.authorized_at, 'last_refresh_at', r.last_refresh_at,
            'access_token_expires_at', r.access_token_expires_at)::text,
        (extract(epoch from clock_timestamp()) * 1000)::bigint, 0);
    RETURN NULL;
END;
$$;

CREATE TRIGGER connections_webhook_event AFTER INSERT OR UPDATE OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION flinks_proxy_connection_event();

CREATE FUNCTION flinks_proxy_session_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_events (type, subject, data, occurred_at, next_attempt_at)
    VALUES ('connect_session.failed', 'session/' || NEW.id,
        json_build_object('session_id', NEW.id, 'pool', NEW.pool, 'status', NEW.status,
            'connection_id', NEW.connection_id, 'redirect_to', NEW.redirect_to,
            'error', NEW.error, 'error_description', NEW.error_description,
            'created_at', NEW.created_at, 'expires_at', NEW.expires_at,
            'finished_at', NEW.finished_at)::text,
        (extract(epoch from clock_timestamp()) * 1000)::bigint, 0);
    RETURN NULL;
END;
$$;

CREATE TRIGGER connect_sessions_webhook_event AFTER UPDATE OF status ON connect_sessions
    FOR EACH ROW WHEN (NEW.status = 'failed' AND OLD.status IS DISTINCT FROM 'failed')
    EXECUTE FUNCTION flinks_proxy_session_event();
