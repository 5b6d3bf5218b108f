-- The sequence number of the last audit entry written with a request's status change, in
-- the same transaction: `audit verify` checks that the entry is still there, so deleting the
-- newest entries and moving the chain's head back is caught.
ALTER TABLE tasks ADD COLUMN audit_seq BIGINT;
CREATE INDEX tasks_audit_seq_idx ON tasks (audit_seq) WHERE audit_seq IS NOT NULL;
