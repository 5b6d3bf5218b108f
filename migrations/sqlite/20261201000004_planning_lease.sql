-- Planning is claimed with a lease like dispatch: the instance planning a request renews
-- `planning_until`; once it lapses (the instance died), another resumes it, never two at once.
ALTER TABLE tasks ADD COLUMN planning_owner TEXT;
ALTER TABLE tasks ADD COLUMN planning_until TEXT;
CREATE INDEX tasks_planning_lease_idx ON tasks (planning_until) WHERE status = 'planning';
