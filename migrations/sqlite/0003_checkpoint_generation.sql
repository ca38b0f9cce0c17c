-- A projection's rows are folded before its write transaction starts; the write then commits
-- only if the checkpoint is still where the fold read it. A reset (rebuild) bumps the
-- generation, so a checkpoint that went back to where it was still tells the two apart.
ALTER TABLE projection_checkpoints ADD COLUMN generation bigint NOT NULL DEFAULT 0;
