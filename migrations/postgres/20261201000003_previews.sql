-- The automatic dry run before approval: each check-mode step's preview task (its own
-- task id, so its result never touches the step), whether it is still pending (for the
-- once-only conditional update), and its outcome.
ALTER TABLE plan_steps ADD COLUMN preview_task_id UUID;
ALTER TABLE plan_steps ADD COLUMN preview_status TEXT;
ALTER TABLE plan_steps ADD COLUMN preview JSONB;
CREATE UNIQUE INDEX plan_steps_preview_idx ON plan_steps (preview_task_id)
    WHERE preview_task_id IS NOT NULL;
