-- Fewer indexes on `tasks`, each of which every status change (four or five per request)
-- had to update:
-- * `tasks_audit_seq_idx`: its only reader, `audit verify`'s check for a log cut back,
--   looks at every request's `audit_seq` anyway (a full pass, once per verify).
-- * `tasks_status_updated_idx`: "in status S, untouched since T" is asked only by the
--   sweeps, for the active statuses (awaiting approval, queued, running), whose rows the
--   `(status, created_at)` index finds as well; those sets are as small as the work in flight.
DROP INDEX IF EXISTS tasks_audit_seq_idx;
DROP INDEX IF EXISTS tasks_status_updated_idx;
