-- The W3C trace context of each live change (docs/tracing.md): a JSON array, one entry per
-- change of the row (in the order of `patches`), each the `traceparent` of the event that made
-- the change or null; NULL when none of them has one (and on rows written before this column).
-- A node that serves the WebSocket change of another node's page sends it in a span of that
-- trace.
ALTER TABLE live_changes ADD COLUMN traces TEXT;
