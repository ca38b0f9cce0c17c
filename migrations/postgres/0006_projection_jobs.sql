-- Rebuilds beside the live model, and verification of the live model against the log.
--
-- One row per projection: the state of its current or last rebuild (`building` while the
-- shadow tables fill, `done`, or `failed` with its error), its progress, and a lease so that
-- one process at a time runs it and another can resume it when the lease runs out (a crash).
-- The shadow's own checkpoint is the `projection_checkpoints` row `<name>__shadow`.
CREATE TABLE projection_rebuilds
(
    name              text   PRIMARY KEY,
    state             text   NOT NULL,
    started_at        text   NOT NULL,
    finished_at       text,
    events_total      bigint NOT NULL,
    events_done       bigint NOT NULL,
    events_per_second bigint NOT NULL,
    error             text,
    owner             text,
    lease_until       bigint NOT NULL,
    updated_at        text   NOT NULL
);

-- The last verification of each projection: when, at which checkpoint, how many rows were
-- compared, how many differed (and the first differences, as JSON), how many were skipped
-- because events arrived for them while it ran.
CREATE TABLE projection_verifications
(
    name           text   PRIMARY KEY,
    verified_at    text   NOT NULL,
    checkpoint     bigint NOT NULL,
    events         bigint NOT NULL,
    rows_compared  bigint NOT NULL,
    rows_differing bigint NOT NULL,
    rows_skipped   bigint NOT NULL,
    differences    text   NOT NULL
);

-- A projection's generation: raised by every rebuild's swap. Live changes record the
-- generation of the model that made them, so a client's document from one model is never
-- patched with changes from another (a resume across a swap gets a snapshot).
ALTER TABLE projection_checkpoints ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE live_changes ADD COLUMN generation bigint NOT NULL DEFAULT 0;
-- The read models refolded by 0005 are a new model: changes of the old one (had any survived
-- in the history) could not be applied to its documents.
UPDATE projection_checkpoints SET generation = 1 WHERE name IN ('batch_state', 'dashboard');
