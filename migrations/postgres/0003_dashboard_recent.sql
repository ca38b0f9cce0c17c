-- The dashboard's "recently finished" list: an owner's batches, latest change first.
CREATE INDEX dashboard_batches_owner_position ON dashboard_batches (owner_id, position);
