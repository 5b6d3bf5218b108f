-- The git trail is written in the background: a request that ended after approval waits
-- for its commit with `commit_id` NULL, and `commit_error` says why a record was refused
-- for good (a different record already committed, an author git cannot take), so it is
-- not tried again. The partial index holds exactly the backlog the trail's writer reads.
ALTER TABLE tasks ADD COLUMN commit_error TEXT;
CREATE INDEX tasks_commit_pending_idx ON tasks (updated_at)
    WHERE commit_id IS NULL AND commit_error IS NULL AND approver IS NOT NULL
    AND status IN ('completed', 'failed', 'cancelled');
