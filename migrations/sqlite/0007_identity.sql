-- The identity lifecycle: user status and token versions, login sessions with rotating
-- refresh tokens, service API keys, the audit log, and a log of identity changes that every
-- node polls to drop what it cached and to close WebSocket sessions that lost their access.
-- Every *_at column added here is bigint: milliseconds since the Unix epoch (UTC).

-- 'active', 'disabled' or 'deleted' (a deleted user keeps its row, so that its batches keep
-- their owner and its username is never given to someone else). token_version is raised by
-- every change that must take access away (disable, delete, role change, password reset);
-- access tokens carry it (claim `ver`) and are refused once it moved on.
ALTER TABLE users ADD COLUMN status text NOT NULL DEFAULT 'active';
ALTER TABLE users ADD COLUMN token_version bigint NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN updated_at bigint NOT NULL DEFAULT 0;

-- A login session: one family of refresh tokens (RFC 9700 section 4.14 rotation). Access
-- tokens name it (claim `sid`); revoking it (logout, reuse of a spent refresh token, a
-- password reset) refuses them and every refresh token of the family at once.
CREATE TABLE auth_sessions
(
    id             text   PRIMARY KEY,
    user_id        text   NOT NULL,
    -- The user's token version when the session began: a change to the user (a password
    -- reset racing this login included) ends the session.
    token_version  bigint NOT NULL,
    created_at     bigint NOT NULL,
    -- The absolute lifetime: no refresh extends the family past it.
    expires_at     bigint NOT NULL,
    last_used_at   bigint NOT NULL,
    revoked_at     bigint,
    revoked_reason text
);
CREATE INDEX auth_sessions_user ON auth_sessions (user_id);

-- Refresh tokens, stored as the SHA-256 of the opaque token only. A token is spent by its
-- first use (used_at); presenting a spent one revokes its session.
CREATE TABLE refresh_tokens
(
    token_hash      text   PRIMARY KEY,
    session_id      text   NOT NULL,
    issued_at       bigint NOT NULL,
    -- The idle lifetime: unused until then, the token (and so its session) lapses.
    idle_expires_at bigint NOT NULL,
    used_at         bigint
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Service API keys (`X-API-Key: efk_<id>_<secret>`): the id is shown in lists, the key
-- is stored as its SHA-256 only. A rotated key keeps working until expires_at (the grace
-- period); a revoked one fails at once. last_used_at is written at most once a minute.
CREATE TABLE api_keys
(
    id           text   PRIMARY KEY,
    user_id      text   NOT NULL,
    name         text   NOT NULL,
    key_hash     text   NOT NULL,
    created_at   bigint NOT NULL,
    created_by   text   NOT NULL,
    expires_at   bigint,
    revoked_at   bigint,
    last_used_at bigint,
    replaced_by  text
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- Who did what, when: logins and their failures, refresh-token reuse, logouts, and every
-- administrative action on users and keys. detail is a JSON object.
CREATE TABLE audit_log
(
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       bigint NOT NULL,
    actor_id text,
    actor    text   NOT NULL,
    action   text   NOT NULL,
    target   text,
    outcome  text   NOT NULL,
    client   text,
    detail   text   NOT NULL
);
CREATE INDEX audit_log_action ON audit_log (action, id);
CREATE INDEX audit_log_actor ON audit_log (actor, id);

-- One row per identity change, polled by every node (and written by the CLI too): the node
-- drops what it cached for the user and re-checks that user's WebSocket sessions.
CREATE TABLE identity_changes
(
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      bigint NOT NULL,
    user_id text   NOT NULL
);
CREATE INDEX identity_changes_at ON identity_changes (at);
