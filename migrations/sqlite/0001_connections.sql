-- Per-user connections (CONNECTIONS.md, "Store"). Times are Unix
-- milliseconds. Tokens are sealed text (v1:<key id>:<base64>), never plain.
CREATE TABLE connections (
    pool TEXT NOT NULL,
    id TEXT NOT NULL,
    sub TEXT,
    state TEXT NOT NULL CHECK (state IN ('active', 'needs_reauthorization')),
    last_error TEXT,
    last_error_description TEXT,
    last_error_at INTEGER,
    created_at INTEGER NOT NULL,
    authorized_at INTEGER NOT NULL,
    last_refresh_at INTEGER,
    access_token_expires_at INTEGER,
    refresh_token TEXT,
    access_token TEXT,
    -- A refresh in progress: who holds it and until when (a holder that
    -- died frees it by expiry).
    lease_owner TEXT,
    lease_until INTEGER,
    PRIMARY KEY (pool, id)
);

CREATE INDEX connections_by_state ON connections (pool, state, id);

-- Store-wide values: the key canary.
CREATE TABLE store_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
