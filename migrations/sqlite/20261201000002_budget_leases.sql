-- Budget reservations carry a lease. A reservation left open by a crashed process stops
-- counting against the month's budget once `expires_at` has passed; before, it held its
-- worst case until the month ended. The open amount is now summed from the live
-- reservations in `llm_usage` (reservers write under BEGIN IMMEDIATE), so the running
-- total `llm_budget.reserved_micros` goes. Timestamps are RFC 3339 text with six fraction
-- digits, as the store writes them.
ALTER TABLE llm_usage ADD COLUMN expires_at TEXT;
-- Reservations open at the upgrade get the default lease from when they were made.
UPDATE llm_usage
    SET expires_at = strftime('%Y-%m-%dT%H:%M:%f', reserved_at, '+10 minutes') || '000Z'
    WHERE status = 'reserved';
CREATE INDEX llm_usage_open_idx ON llm_usage (provider, month, expires_at)
    WHERE status = 'reserved';
ALTER TABLE llm_budget DROP COLUMN reserved_micros;
