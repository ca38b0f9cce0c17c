-- Read models. Every projection's tables share one shape: a JSON document per key, with the
-- columns that queries filter and sort on. `version` is the aggregate sequence of the last
-- event applied to the row, `position` its global position.
CREATE TABLE projection_checkpoints
(
    name           text   PRIMARY KEY,
    tx             bigint NOT NULL,
    position       bigint NOT NULL,
    events_applied bigint NOT NULL,
    updated_at     text   NOT NULL
);

CREATE TABLE batch_state
(
    id               text   PRIMARY KEY,
    owner_id         text   NOT NULL,
    status           text   NOT NULL,
    created_position bigint NOT NULL,
    version          bigint NOT NULL,
    position         bigint NOT NULL,
    doc              text   NOT NULL
);
CREATE INDEX batch_state_owner ON batch_state (owner_id, created_position);
CREATE INDEX batch_state_status ON batch_state (status, created_position);

CREATE TABLE dashboard_batches
(
    id               text   PRIMARY KEY,
    owner_id         text   NOT NULL,
    status           text   NOT NULL,
    created_position bigint NOT NULL,
    version          bigint NOT NULL,
    position         bigint NOT NULL,
    doc              text   NOT NULL
);
CREATE INDEX dashboard_batches_owner ON dashboard_batches (owner_id, status, created_position);

CREATE TABLE dashboard_owners
(
    id               text   PRIMARY KEY,
    owner_id         text   NOT NULL,
    status           text   NOT NULL,
    created_position bigint NOT NULL,
    version          bigint NOT NULL,
    position         bigint NOT NULL,
    doc              text   NOT NULL
);

CREATE TABLE users
(
    id            text PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    role          text NOT NULL,
    password_hash text NOT NULL,
    created_at    text NOT NULL
);
