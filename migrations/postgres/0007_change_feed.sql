-- Issue 20: a change feed. Every change to a connection is a row here, in
-- the order its sequence number was drawn; each replica reads "changes
-- since N" once a second (and at once when the doorbell below rings), so
-- what it keeps in memory follows the store at a cost per replica, not per
-- user. It replaces re-reading every cached connection every 5 s.
--
-- Sequence numbers are drawn at insert and become visible at commit, so a
-- reader can see seq 11 before seq 10: readers keep the numbers they
-- skipped and ask for them again (src/store/postgres/feed.rs). Rows are
-- pruned by age; `at` is the database's clock.
CREATE TABLE connection_changes (
    seq BIGSERIAL PRIMARY KEY,
    pool TEXT NOT NULL,
    id TEXT NOT NULL,
    event TEXT NOT NULL,
    holder TEXT NOT NULL DEFAULT '',
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX connection_changes_at ON connection_changes (at);

-- The events of 0001's trigger, now written to the feed. Lease-only
-- updates are not changes.
CREATE FUNCTION flinks_proxy_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event TEXT;
    holder TEXT := '';
    r connections;
BEGIN
    IF TG_OP = 'INSERT' THEN
        event := 'created';
        r := NEW;
    ELSIF TG_OP = 'DELETE' THEN
        event := 'deleted';
        r := OLD;
    ELSIF NEW.state <> OLD.state AND NEW.state = 'needs_reauthorization' THEN
        event := 'needs_reauthorization';
        r := NEW;
    ELSIF NEW.authorized_at <> OLD.authorized_at OR NEW.state <> OLD.state THEN
        event := 'reauthorized';
        r := NEW;
    ELSIF NEW.access_token IS DISTINCT FROM OLD.access_token
       OR NEW.refresh_token IS DISTINCT FROM OLD.refresh_token THEN
        event := 'refreshed';
        holder := COALESCE(OLD.lease_owner, '');
        r := NEW;
    ELSE
        RETURN NULL;
    END IF;
    INSERT INTO connection_changes (pool, id, event, holder)
        VALUES (r.pool, r.id, event, holder);
    RETURN NULL;
END;
$$;

DROP TRIGGER connections_notify ON connections;
DROP FUNCTION flinks_proxy_notify();

CREATE TRIGGER connections_log AFTER INSERT OR UPDATE OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION flinks_proxy_log_change();

-- The doorbell: one notification per statement that wrote to the feed
-- (PostgreSQL folds equal payloads of one transaction into one), delivered
-- at commit. Replicas read the feed when it rings; the payload says
-- nothing, so a lost notification costs at most one poll interval.
CREATE FUNCTION flinks_proxy_ring() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flinks_proxy_connections', 'changed');
    RETURN NULL;
END;
$$;

CREATE TRIGGER connection_changes_ring AFTER INSERT ON connection_changes
    FOR EACH STATEMENT EXECUTE FUNCTION flinks_proxy_ring();
