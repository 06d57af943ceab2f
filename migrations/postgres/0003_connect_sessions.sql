-- Issue 17: connect sessions (CONNECT.md, "Connect sessions"). One row per
-- link an app asked for. Secrets are never stored in clear: the link's
-- token, the OAuth `state` and the browser cookie as SHA-256 hex (each is
-- 256 random bits, so the hash cannot be turned back), the PKCE verifier
-- sealed like tokens. Times are Unix milliseconds.
CREATE TABLE connect_sessions (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    -- pending | connected | failed | expired
    status TEXT NOT NULL CHECK (status IN ('pending', 'connected', 'failed', 'expired')),
    -- new (link not opened) | opened (sent to the bank) | exchanging (state spent)
    phase TEXT NOT NULL CHECK (phase IN ('new', 'opened', 'exchanging')),
    connection_id TEXT,
    redirect_to TEXT,
    authorize_params TEXT NOT NULL,
    state_hash TEXT UNIQUE,
    browser_hash TEXT,
    code_verifier TEXT,
    error TEXT,
    error_description TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    opened_at BIGINT,
    finished_at BIGINT
);

CREATE INDEX connect_sessions_pending ON connect_sessions (status, expires_at);
