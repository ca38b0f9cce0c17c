-- The cqrs-es / postgres-es events table, plus a global order.
--
-- postgres-es inserts the first seven columns. `global_position` and `transaction_id` are filled
-- by their defaults. Readers follow the log in (transaction_id, global_position) order and only
-- up to pg_snapshot_xmin(pg_current_snapshot()): identity values are taken before commit, so a
-- plain `global_position > $last` reader would skip the events of a transaction that commits
-- late. Transaction ids below the snapshot's xmin are all finished, so nothing can appear behind
-- a reader's checkpoint.
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         json                         NOT NULL,
    metadata        json                         NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_position ON events (global_position);
CREATE INDEX events_global_order ON events (transaction_id, global_position);
