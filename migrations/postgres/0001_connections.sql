-- Per-user connections (CONNECTIONS.md, "Store"), the same columns and
-- meaning as migrations/sqlite/0001_connections.sql. Times are Unix
-- milliseconds. Tokens are sealed text (v1:<key id>:<base64>), never plain.
CREATE TABLE connections (
    pool TEXT NOT NULL,
    id TEXT NOT NULL,
    sub TEXT,
    state TEXT NOT NULL CHECK (state IN ('active', 'needs_reauthorization')),
    last_error TEXT,
    last_error_description TEXT,
    last_error_at BIGINT,
    created_at BIGINT NOT NULL,
    authorized_at BIGINT NOT NULL,
    last_refresh_at BIGINT,
    access_token_expires_at BIGINT,
    refresh_token TEXT,
    access_token TEXT,
    -- A refresh in progress: which process holds it and until when, on the
    -- database's clock (a holder that died frees it by expiry).
    lease_owner TEXT,
    lease_until BIGINT,
    PRIMARY KEY (pool, id)
);

CREATE INDEX connections_by_state ON connections (pool, state, id);

-- Store-wide values: the key canary.
CREATE TABLE store_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Every replica hears about changes to a connection: payload
-- `pool/id/event/holder` on channel flinks_proxy_connections (pool names and
-- ids never contain '/'). Lease-only updates are not announced. Written by a
-- trigger so changes made by `flinks-proxy connections delete` are heard too.
CREATE FUNCTION flinks_proxy_notify() RETURNS trigger LANGUAGE plpgsql AS $$
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
    PERFORM pg_notify('flinks_proxy_connections',
        r.pool || '/' || r.id || '/' || event || '/' || holder);
    RETURN NULL;
END;
$$;

CREATE TRIGGER connections_notify AFTER INSERT OR UPDATE OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION flinks_proxy_notify();
