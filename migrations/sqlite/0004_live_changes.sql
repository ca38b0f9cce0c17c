-- The live change feed behind GET /v1/ws.
--
-- Projection workers insert every change a WebSocket client may see into `live_changes` in the
-- same transaction as their read-model writes, and, after the commit, hand them to this process's
-- WebSocket hub (SQLite runs one node).
-- The rows are also the resume history (`since`), kept for a retention period.
--
-- `live_topics` counts the versions of topics that are not one read-model row (a teacher's
-- dashboard). It is not a projection table: a rebuild keeps it, so versions never go back.
CREATE TABLE live_changes
(
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    page       text   NOT NULL,
    topic      text   NOT NULL,
    version    bigint NOT NULL,
    data       text   NOT NULL,
    created_at bigint NOT NULL
);
CREATE UNIQUE INDEX live_changes_topic_version ON live_changes (topic, version);
CREATE INDEX live_changes_page ON live_changes (page);
CREATE INDEX live_changes_created_at ON live_changes (created_at);

CREATE TABLE live_topics
(
    topic   text   PRIMARY KEY,
    version bigint NOT NULL
);
