-- Read models written in proportion to the change.
--
-- A batch's essays and its per-phase outcomes, and a dashboard batch's per-essay outcomes, move
-- out of the batch's document into rows of their own, so that an event touches its own rows
-- and a page never rewrites a batch's whole state. `batch_state.doc` and
-- `dashboard_batches.doc` now hold only the small rest (the summary); queries put the whole
-- view back together.
--
-- The live feed now stores JSON Patch documents (RFC 6902) instead of whole states, so the old
-- history cannot be served: it is dropped, and clients that resume from it get a snapshot.
--
-- The documents' shape changed, so both projections are rebuilt from the event log: their
-- tables are emptied and their checkpoints reset; the workers refold the log at the next start.
DELETE FROM batch_state;
DELETE FROM dashboard_batches;
DELETE FROM dashboard_owners;
UPDATE projection_checkpoints SET tx = 0, position = 0, events_applied = 0
 WHERE name IN ('batch_state', 'dashboard');

-- Lists read one index range each, whatever the history: a teacher's batches of one status
-- newest first (the batch list, the dashboard's active batches), a teacher's finished batches
-- of one status by last change (the dashboard's recently finished), and every batch newest
-- first (an admin's list).
CREATE INDEX batch_state_owner_status ON batch_state (owner_id, status, created_position);
CREATE INDEX batch_state_created ON batch_state (created_position);
DROP INDEX dashboard_batches_owner_position;
CREATE INDEX dashboard_batches_owner_status_position ON dashboard_batches (owner_id, status, position);

-- One row per essay of a batch, in the order they were added.
CREATE TABLE batch_state_essays
(
    batch_id text   NOT NULL,
    ordinal  bigint NOT NULL,
    essay_id text   NOT NULL,
    doc      text   NOT NULL,
    PRIMARY KEY (batch_id, ordinal)
) WITHOUT ROWID;

-- The latest outcome of one essay in one phase (`outcome`: succeeded or failed, for counting).
CREATE TABLE batch_state_outcomes
(
    batch_id text NOT NULL,
    phase    text NOT NULL,
    essay_id text NOT NULL,
    outcome  text NOT NULL,
    doc      text NOT NULL,
    PRIMARY KEY (batch_id, phase, essay_id)
) WITHOUT ROWID;

-- The dashboard's per-essay outcomes of a batch's current (or last) pipeline.
CREATE TABLE dashboard_outcomes
(
    batch_id text NOT NULL,
    essay_id text NOT NULL,
    phase    text NOT NULL,
    outcome  text NOT NULL,
    PRIMARY KEY (batch_id, essay_id, phase)
) WITHOUT ROWID;

DROP TABLE live_changes;
-- One row per run of a topic's consecutive changes in one committed page (a burst of one
-- batch's events is one row, not hundreds): versions `version` to `last_version`, and their
-- patches, each a JSON Patch (RFC 6902) from the version before it, as a JSON array.
CREATE TABLE live_changes
(
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    page         text   NOT NULL,
    topic        text   NOT NULL,
    version      bigint NOT NULL,
    last_version bigint NOT NULL,
    patches      text   NOT NULL,
    created_at   bigint NOT NULL
);
CREATE UNIQUE INDEX live_changes_topic_version ON live_changes (topic, version);
CREATE INDEX live_changes_page ON live_changes (page);
CREATE INDEX live_changes_created_at ON live_changes (created_at);
