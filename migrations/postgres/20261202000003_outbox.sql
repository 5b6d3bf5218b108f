-- Outgoing work messages, stored in the transaction that marks their steps dispatched: a
-- crash between that commit and the publish leaves the message here, and the engine's
-- relay publishes it (for as long as its step is still dispatched with that attempt).
-- A row goes once the broker confirmed the message.
CREATE TABLE outbox (
    id          UUID PRIMARY KEY,
    task_id     UUID NOT NULL REFERENCES plan_steps (task_id) ON DELETE CASCADE,
    attempt     BIGINT NOT NULL,
    queue       TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX outbox_created_idx ON outbox (created_at);
