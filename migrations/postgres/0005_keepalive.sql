-- Keep-alive (CONNECT.md, "Keeping connections alive"): the idle
-- candidates of a pool (active, refresh token unused since a cutoff,
-- oldest first) and the oldest unused refresh token's age are read through
-- this index, never by scanning the table. A refresh token was last used
-- at COALESCE(last_refresh_at, authorized_at): an authorization sets
-- last_refresh_at NULL. `id` last: keyset paging in (idle, id) order.
-- Independent of every migration after 0003. (Built in the migration's
-- transaction: writes to `connections` wait while it builds, a few
-- seconds per million rows.)
CREATE INDEX connections_idle ON connections
    (pool, state, (COALESCE(last_refresh_at, authorized_at)), id);
