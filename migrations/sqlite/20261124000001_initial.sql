-- Chiffon's schema for SQLite (the same tables as migrations/postgres). `tasks`, `execution_logs`, `resource_metrics` and
-- `audit_log` are the contract's names; the rest is what the engine needs besides.
-- Timestamps are TEXT in one fixed format (RFC 3339 UTC, six fraction digits, `Z`), so
-- comparing the text compares the instants; uuids are 16-byte BLOBs; JSON is TEXT.

-- Requests. Named `tasks` by the contract.
CREATE TABLE tasks (
    id               BLOB PRIMARY KEY,
    trace_id         TEXT NOT NULL,
    text             TEXT NOT NULL,
    requester        TEXT NOT NULL,
    dry_run          INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL CHECK (status IN ('planning', 'awaiting_approval', 'queued',
                         'running', 'completed', 'failed', 'cancelled', 'rejected')),
    plan             TEXT,
    approver         TEXT,
    approval_comment TEXT,
    error            TEXT,
    commit_id        TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
-- list_requests: newest first, optionally by status; and "in status S, untouched since T".
CREATE INDEX tasks_created_idx ON tasks (created_at DESC, id DESC);
CREATE INDEX tasks_status_created_idx ON tasks (status, created_at DESC, id DESC);
CREATE INDEX tasks_status_updated_idx ON tasks (status, updated_at);

-- The steps of a request's plan; `task_id` is the id agents see.
CREATE TABLE plan_steps (
    task_id       BLOB PRIMARY KEY,
    request_id    BLOB NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL CHECK (seq >= 0),
    action        TEXT NOT NULL,
    parameters    TEXT NOT NULL,
    agent_type    TEXT NOT NULL,
    resources     TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'dispatched', 'running',
                      'completed', 'failed', 'cancelled', 'skipped')),
    attempt       INTEGER NOT NULL DEFAULT 0,
    agent_id      TEXT,
    queue         TEXT,
    progress      INTEGER NOT NULL DEFAULT 0,
    output        TEXT,
    diff          TEXT,
    changed       INTEGER,
    error         TEXT,
    ready_at      TEXT,
    dispatched_at TEXT,
    deadline_at   TEXT,
    finished_at   TEXT,
    not_before    TEXT,
    -- The dispatcher instance that holds the step, until `claim_until`.
    claimed_by    TEXT,
    claim_until   TEXT,
    UNIQUE (request_id, seq)
);
-- claim_ready_steps: ready steps, oldest first.
CREATE INDEX plan_steps_ready_idx ON plan_steps (ready_at, seq) WHERE status = 'ready';
-- overdue_steps.
CREATE INDEX plan_steps_deadline_idx ON plan_steps (deadline_at)
    WHERE status IN ('dispatched', 'running');

CREATE TABLE execution_logs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id BLOB NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    task_id    BLOB,
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    progress   INTEGER,
    message    TEXT NOT NULL
);
CREATE INDEX execution_logs_request_idx ON execution_logs (request_id, id);

-- Agents as last seen through their heartbeats.
CREATE TABLE agents (
    agent_id   TEXT PRIMARY KEY,
    agent_type TEXT NOT NULL,
    hostname   TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen  TEXT NOT NULL,
    heartbeat  TEXT NOT NULL
);

-- One row per heartbeat: the fleet's resources over time.
CREATE TABLE resource_metrics (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id        TEXT NOT NULL,
    at              TEXT NOT NULL,
    cpu_percent     REAL NOT NULL,
    cpu_cores       INTEGER NOT NULL,
    load_1m         REAL NOT NULL,
    memory_used_gb  REAL NOT NULL,
    memory_total_gb REAL NOT NULL,
    gpus            TEXT NOT NULL,
    running_tasks   INTEGER NOT NULL
);
CREATE INDEX resource_metrics_agent_idx ON resource_metrics (agent_id, at);

-- Budget accounting per provider and month; reservations are checked against it with one
-- conditional UPDATE, which is what makes them atomic across instances.
CREATE TABLE llm_budget (
    provider        TEXT NOT NULL,
    month           TEXT NOT NULL,
    spent_micros    INTEGER NOT NULL DEFAULT 0,
    reserved_micros INTEGER NOT NULL DEFAULT 0,
    calls           INTEGER NOT NULL DEFAULT 0,
    input_tokens    INTEGER NOT NULL DEFAULT 0,
    output_tokens   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, month)
);
CREATE INDEX llm_budget_month_idx ON llm_budget (month);

-- One row per LLM call: written as a reservation, then settled with the real cost.
CREATE TABLE llm_usage (
    id              BLOB PRIMARY KEY,
    provider        TEXT NOT NULL,
    model           TEXT NOT NULL,
    month           TEXT NOT NULL,
    request_id      BLOB,
    status          TEXT NOT NULL CHECK (status IN ('reserved', 'settled')),
    reserved_micros INTEGER NOT NULL,
    cost_micros     INTEGER,
    input_tokens    INTEGER,
    output_tokens   INTEGER,
    ok              INTEGER,
    reserved_at     TEXT NOT NULL,
    settled_at      TEXT
);
CREATE INDEX llm_usage_provider_month_idx ON llm_usage (provider, month);
CREATE INDEX llm_usage_request_idx ON llm_usage (request_id) WHERE request_id IS NOT NULL;

CREATE TABLE plan_cache (
    key        TEXT PRIMARY KEY,
    plan       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- Append-only and hash-chained; see chiffon_core::audit::chain. `details` is TEXT so the
-- hashed bytes are exactly the stored ones.
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY CHECK (seq > 0),
    at         TEXT NOT NULL,
    request_id BLOB,
    actor      TEXT NOT NULL,
    event      TEXT NOT NULL,
    details    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_log_request_idx ON audit_log (request_id, seq) WHERE request_id IS NOT NULL;

-- The chain's head: appenders lock this row, and verify compares it with the last row, so
-- deleting the newest entries is detected too.
CREATE TABLE audit_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq  INTEGER NOT NULL,
    last_hash TEXT NOT NULL
);
INSERT INTO audit_head (id, last_seq, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
