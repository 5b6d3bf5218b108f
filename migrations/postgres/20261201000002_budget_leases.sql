-- Budget reservations carry a lease. A reservation left open by a crashed process stops
-- counting against the month's budget once `expires_at` has passed; before, it held its
-- worst case until the month ended. The open amount is now summed from the live
-- reservations in `llm_usage` (reservers of one provider and month serialise on its
-- `llm_budget` row), so the running total `llm_budget.reserved_micros` goes.
ALTER TABLE llm_usage ADD COLUMN expires_at TIMESTAMPTZ;
-- Reservations open at the upgrade get the default lease from when they were made.
UPDATE llm_usage SET expires_at = reserved_at + INTERVAL '10 minutes' WHERE status = 'reserved';
CREATE INDEX llm_usage_open_idx ON llm_usage (provider, month, expires_at)
    WHERE status = 'reserved';
ALTER TABLE llm_budget DROP COLUMN reserved_micros;
