-- Outgoing work messages, stored in the transaction that marks their steps dispatched: a
-- crash between that commit and the publish leaves the message here, and the engine's
-- relay publishes it (for as long as its step is still dispatched with that attempt).
-- A row goes once the broker confirmed the message.
CREATE TABLE outbox (
    id          BLOB PRIMARY KEY,
    task_id     BLOB NOT NULL REFERENCES plan_steps (task_id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    queue       TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX outbox_created_idx ON outbox (created_at);
