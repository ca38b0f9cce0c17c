-- A user's rate-limit tier (api::edge::ratelimit, docs/rate-limits.md): the name of a tier of
-- the `[rate_limit.tiers]` configuration. NULL means the configured default tier, and so does
-- a name that is no longer configured. Admins set it with PATCH /v1/admin/users/{id}
-- (`{"tier": "pro"}`, `null` for the default) or `essayflow users set-tier`.
ALTER TABLE users ADD COLUMN tier text;
