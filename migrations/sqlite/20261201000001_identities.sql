-- Authenticated identities (the safety issue): who submitted a request, as authenticated
-- (what the four-eyes rule compares); which broker user a step's attempt is bound to; which
-- broker user registered an agent id.
ALTER TABLE tasks ADD COLUMN submitted_by TEXT;
ALTER TABLE plan_steps ADD COLUMN broker_user TEXT;
ALTER TABLE plan_steps ADD COLUMN broker_attempt INTEGER;
ALTER TABLE agents ADD COLUMN broker_user TEXT;
