-- Chiffon's schema for PostgreSQL. `tasks`, `execution_logs`, `resource_metrics` and
-- `audit_log` are the contract's names; the rest is what the engine needs besides.
-- Timestamps are TIMESTAMPTZ (microseconds, like every value the store writes); counters
-- are BIGINT so one Rust type (i64) reads them all.

-- Requests. Named `tasks` by the contract.
CREATE TABLE tasks (
    id               UUID PRIMARY KEY,
    trace_id         TEXT NOT NULL,
    text             TEXT NOT NULL,
    requester        TEXT NOT NULL,
    dry_run          BOOLEAN NOT NULL DEFAULT FALSE,
    status           TEXT NOT NULL CHECK (status IN ('planning', 'awaiting_approval', 'queued',
                         'running', 'completed', 'failed', 'cancelled', 'rejected')),
    plan             JSONB,
    approver         TEXT,
    approval_comment TEXT,
    error            JSONB,
    commit_id        TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
-- list_requests: newest first, optionally by status; and "in status S, untouched since T".
CREATE INDEX tasks_created_idx ON tasks (created_at DESC, id DESC);
CREATE INDEX tasks_status_created_idx ON tasks (status, created_at DESC, id DESC);
CREATE INDEX tasks_status_updated_idx ON tasks (status, updated_at);

-- The steps of a request's plan; `task_id` is the id agents see.
CREATE TABLE plan_steps (
    task_id       UUID PRIMARY KEY,
    request_id    UUID NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL CHECK (seq >= 0),
    action        TEXT NOT NULL,
    parameters    JSONB NOT NULL,
    agent_type    TEXT NOT NULL,
    resources     JSONB NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'dispatched', 'running',
                      'completed', 'failed', 'cancelled', 'skipped')),
    attempt       BIGINT NOT NULL DEFAULT 0,
    agent_id      TEXT,
    queue         TEXT,
    progress      BIGINT NOT NULL DEFAULT 0,
    output        TEXT,
    diff          TEXT,
    changed       BOOLEAN,
    error         JSONB,
    ready_at      TIMESTAMPTZ,
    dispatched_at TIMESTAMPTZ,
    deadline_at   TIMESTAMPTZ,
    finished_at   TIMESTAMPTZ,
    not_before    TIMESTAMPTZ,
    -- The dispatcher instance that holds the step, until `claim_until`.
    claimed_by    TEXT,
    claim_until   TIMESTAMPTZ,
    UNIQUE (request_id, seq)
);
-- claim_ready_steps: ready steps, oldest first.
CREATE INDEX plan_steps_ready_idx ON plan_steps (ready_at, seq) WHERE status = 'ready';
-- overdue_steps.
CREATE INDEX plan_steps_deadline_idx ON plan_steps (deadline_at)
    WHERE status IN ('dispatched', 'running');

CREATE TABLE execution_logs (
    id         BIGSERIAL PRIMARY KEY,
    request_id UUID NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    task_id    UUID,
    at         TIMESTAMPTZ NOT NULL,
    kind       TEXT NOT NULL,
    progress   BIGINT,
    message    TEXT NOT NULL
);
CREATE INDEX execution_logs_request_idx ON execution_logs (request_id, id);

-- Agents as last seen through their heartbeats.
CREATE TABLE agents (
    agent_id   TEXT PRIMARY KEY,
    agent_type TEXT NOT NULL,
    hostname   TEXT NOT NULL,
    first_seen TIMESTAMPTZ NOT NULL,
    last_seen  TIMESTAMPTZ NOT NULL,
    heartbeat  JSONB NOT NULL
);

-- One row per heartbeat: the fleet's resources over time.
CREATE TABLE resource_metrics (
    id              BIGSERIAL PRIMARY KEY,
    agent_id        TEXT NOT NULL,
    at              TIMESTAMPTZ NOT NULL,
    cpu_percent     DOUBLE PRECISION NOT NULL,
    cpu_cores       BIGINT NOT NULL,
    load_1m         DOUBLE PRECISION NOT NULL,
    memory_used_gb  DOUBLE PRECISION NOT NULL,
    memory_total_gb DOUBLE PRECISION NOT NULL,
    gpus            JSONB NOT NULL,
    running_tasks   BIGINT NOT NULL
);
CREATE INDEX resource_metrics_agent_idx ON resource_metrics (agent_id, at);

-- Budget accounting per provider and month; reservations are checked against it with one
-- conditional UPDATE, which is what makes them atomic across instances.
CREATE TABLE llm_budget (
    provider        TEXT NOT NULL,
    month           TEXT NOT NULL,
    spent_micros    BIGINT NOT NULL DEFAULT 0,
    reserved_micros BIGINT NOT NULL DEFAULT 0,
    calls           BIGINT NOT NULL DEFAULT 0,
    input_tokens    BIGINT NOT NULL DEFAULT 0,
    output_tokens   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, month)
);
CREATE INDEX llm_budget_month_idx ON llm_budget (month);

-- One row per LLM call: written as a reservation, then settled with the real cost.
CREATE TABLE llm_usage (
    id              UUID PRIMARY KEY,
    provider        TEXT NOT NULL,
    model           TEXT NOT NULL,
    month           TEXT NOT NULL,
    request_id      UUID,
    status          TEXT NOT NULL CHECK (status IN ('reserved', 'settled')),
    reserved_micros BIGINT NOT NULL,
    cost_micros     BIGINT,
    input_tokens    BIGINT,
    output_tokens   BIGINT,
    ok              BOOLEAN,
    reserved_at     TIMESTAMPTZ NOT NULL,
    settled_at      TIMESTAMPTZ
);
CREATE INDEX llm_usage_provider_month_idx ON llm_usage (provider, month);
CREATE INDEX llm_usage_request_idx ON llm_usage (request_id) WHERE request_id IS NOT NULL;

CREATE TABLE plan_cache (
    key        TEXT PRIMARY KEY,
    plan       JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Append-only and hash-chained; see chiffon_core::audit::chain. `details` is TEXT so the
-- hashed bytes are exactly the stored ones.
CREATE TABLE audit_log (
    seq        BIGINT PRIMARY KEY CHECK (seq > 0),
    at         TIMESTAMPTZ NOT NULL,
    request_id UUID,
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
    id        SMALLINT PRIMARY KEY CHECK (id = 1),
    last_seq  BIGINT NOT NULL,
    last_hash TEXT NOT NULL
);
INSERT INTO audit_head (id, last_seq, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
