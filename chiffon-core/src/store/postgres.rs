//! The production store: PostgreSQL through sqlx. Several orchestrator instances may share
//! one database: status changes are conditional updates, dispatch claims use
//! `FOR UPDATE SKIP LOCKED`, budget reservations are one conditional `UPDATE` of a
//! per-(provider, month) row, and audit appenders serialise on the locked `audit_head` row.
//!
//! The statements are [`super::sql`]'s; this module is PostgreSQL's dialect of them and its
//! connection.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row};
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

use chiffon_protocol::{ErrorPayload, Heartbeat, Resources};

use super::sql::*;
use super::{
    fits_budget, lease_end, preview_status_str, Agents, AuditLog, BudgetLedger, Logs, PlanCache,
    Requests, Steps, Store, StoreError, AGENT_TAKEOVER_AFTER,
};
use crate::audit::chain::{self, AuditKey};
use crate::model::*;

/// The PostgreSQL schema (`migrations/postgres`), embedded.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// Connections per instance: enough for the engine's concurrent work, modest enough that
/// several instances fit under PostgreSQL's default `max_connections` (100).
const MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

sql_store! {
    store: PgStore,
    db: Postgres,
    pool: PgPool,
    row: PgRow,
    backend: "postgres",
    // The budget row's and the audit head's lock serialise their writers (on every
    // instance); under READ COMMITTED what is read after the lock sees every write
    // committed before it.
    for_update: " FOR UPDATE",
    // Claimers on several instances stay off each other's rows.
    skip_locked: " FOR UPDATE SKIP LOCKED",
    one_of_v: "= ANY(string_to_array(v_from, ','))",
    // The audit head moves in a data-modifying WITH of the entries' INSERT.
    head_in_insert: true,
    // Two groups at a time: one runs its statements while the other finishes its entries
    // and commits (measured: the one group writer was busy 82% of a run at 64 in flight,
    // half of it waiting between statements).
    concurrent_groups: 2,
}

impl PgStore {
    /// Connects a pool to `postgres://…` and applies the migrations (sqlx takes an advisory
    /// lock, so instances starting together do not race).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let store = PgStore::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }
}

// ---- the dialect ----

/// Transactions whose statements may take several rows plan each statement for its own
/// values (one round trip with the `BEGIN`). A statement stays prepared on its connection,
/// but the plan PostgreSQL may otherwise settle on after five executions (its "generic"
/// plan, made once for any values) would assume ten rows in each unnested array, and keep
/// what it chose while a table was small (a sequential scan) however large the table
/// grows: on a new database, with autovacuum off or between its analyses, a group's step
/// changes cost five times as much (measured). Planning costs about 0.1-0.2 ms a statement,
/// shared by its rows: a group of one row per statement keeps the plan made once
/// ([`BEGIN_WRITE`]; its statements are written for one row, see [`push_rows`]). Every
/// statement that takes several rows or ids and joins or scans a table runs in a
/// transaction begun with this or [`BEGIN_READ`].
const BEGIN_ROWS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";
const BEGIN_WRITE: &str = "BEGIN";
/// A reading transaction, planned as [`BEGIN_ROWS`]'s.
const BEGIN_READ: &str = "BEGIN READ ONLY; SET LOCAL plan_cache_mode = force_custom_plan";
/// A snapshot in which the audit head and its rows agree, whatever appenders do meanwhile.
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::error::ErrorKind;
    match e {
        sqlx::Error::Database(d) => {
            // Serialization failure, deadlock, lock timeout, shutdown, too many connections:
            // worth retrying.
            if matches!(
                d.code().as_deref(),
                Some("40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300")
            ) {
                return StoreError::Unavailable(Box::new(sqlx::Error::Database(d)));
            }
            match d.kind() {
                ErrorKind::UniqueViolation => StoreError::Conflict {
                    message: format!("duplicate key: {}", d.message()),
                    current: None,
                },
                ErrorKind::ForeignKeyViolation => {
                    StoreError::not_found("the referenced request (foreign key)")
                }
                _ => StoreError::Backend(Box::new(sqlx::Error::Database(d))),
            }
        }
        e @ (sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed) => StoreError::Unavailable(Box::new(e)),
        e => StoreError::Backend(Box::new(e)),
    }
}

/// The stored form of an instant (TIMESTAMPTZ keeps microseconds).
fn ts(at: DateTime<Utc>) -> DateTime<Utc> {
    trunc(at)
}

fn ts_col(row: &PgRow, name: &str) -> Result<DateTime<Utc>, StoreError> {
    row.try_get(name).map_err(|e| corrupt(name, e))
}

fn opt_ts_col(row: &PgRow, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.try_get(name).map_err(|e| corrupt(name, e))
}

/// A list of statuses, bound as one text (`a,b`; statuses hold no comma) so that it fits
/// one cell of a [`Col`] (`one_of_v` splits it).
fn status_list(statuses: &[StepStatus]) -> Result<String, StoreError> {
    Ok(statuses
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(","))
}

/// Statements whose input is a table of rows keep one text whatever the row count
/// ([`push_rows`], [`push_in`]): they stay prepared on their connection.
const FIXED_SHAPE: bool = true;

/// Tables of at most this many rows are bound as `VALUES` lists: an unnested array is
/// read into a tuple store of its own, per column, which costs more than the parse it saves
/// for a few rows (measured one request at a time: about 0.3 ms a request more). Each row
/// count is a statement of its own, kept prepared (a few per kind of write).
const VALUES_ROWS: usize = 4;

/// The rows of `cols` as a query: `SELECT * FROM UNNEST($1::uuid[], $2::text[], …)`, one
/// array per column; up to [`VALUES_ROWS`] rows as `VALUES ($1::uuid, $2::text, …), …`. A
/// row's plan PostgreSQL may make once for any values (its key is a parameter: an index
/// scan), where an array's length is not known to a plan made once (see [`BEGIN_ROWS`]).
fn push_rows(q: &mut QueryBuilder<Postgres>, cols: Vec<Col<'_>>) -> Result<(), StoreError> {
    if row_count(&cols)? <= VALUES_ROWS {
        return push_value_rows(q, &cols);
    }
    q.push("SELECT * FROM UNNEST(");
    for (i, c) in cols.into_iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        let cast = cell_cast(&c);
        match c {
            Col::Uuid(v) => q.push_bind(v),
            Col::OptUuid(v) => q.push_bind(v),
            Col::Text(v) => q.push_bind(v),
            Col::OptText(v) => q.push_bind(v),
            Col::Int(v) => q.push_bind(v),
            Col::Bool(v) => q.push_bind(v),
            Col::Time(v) => q.push_bind(v.into_iter().map(|t| t.map(ts)).collect::<Vec<_>>()),
            Col::Json(v) => q.push_bind(v),
        };
        q.push(cast).push("[]");
    }
    q.push(")");
    Ok(())
}

/// The type of a column's cells, as a cast.
fn cell_cast(c: &Col<'_>) -> &'static str {
    match c {
        Col::Uuid(_) | Col::OptUuid(_) => "::uuid",
        Col::Text(_) | Col::OptText(_) => "::text",
        Col::Int(_) => "::int8",
        Col::Bool(_) => "::bool",
        Col::Time(_) => "::timestamptz",
        Col::Json(_) => "::jsonb",
    }
}

/// ` = ANY($1::uuid[])`: "is one of `ids`", whatever their number; one as ` = $1`
/// (see [`push_rows`]).
fn push_in(q: &mut QueryBuilder<Postgres>, ids: &[Uuid]) {
    if let [id] = ids {
        q.push(" = ").push_bind(*id);
        return;
    }
    q.push(" = ANY(");
    q.push_bind(ids.to_vec());
    q.push("::uuid[])");
}
