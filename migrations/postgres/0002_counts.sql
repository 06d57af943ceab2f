-- Issue 15: per-state counts kept by a trigger, so /status and the
-- `flinks_proxy_connections` gauge read one row per pool and state instead
-- of scanning the table every few seconds on every replica.
CREATE TABLE connection_counts (
    pool TEXT NOT NULL,
    state TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (pool, state)
);

INSERT INTO connection_counts (pool, state, n)
    SELECT pool, state, COUNT(*) FROM connections GROUP BY pool, state;

CREATE FUNCTION flinks_proxy_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE connection_counts SET n = n - 1 WHERE pool = OLD.pool AND state = OLD.state;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO connection_counts (pool, state, n) VALUES (NEW.pool, NEW.state, 1)
            ON CONFLICT (pool, state) DO UPDATE SET n = connection_counts.n + 1;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER connections_count_insert_delete AFTER INSERT OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION flinks_proxy_count();

CREATE TRIGGER connections_count_update AFTER UPDATE OF state, pool ON connections
    FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state OR NEW.pool IS DISTINCT FROM OLD.pool)
    EXECUTE FUNCTION flinks_proxy_count();
