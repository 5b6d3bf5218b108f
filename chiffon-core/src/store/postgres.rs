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
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row};
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
    one_of_v: "= ANY(v_from)",
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
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let store = PgStore::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }
}

// ---- the dialect ----

const BEGIN_WRITE: &str = "BEGIN";
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

/// A list of statuses, bound as a `TEXT[]`.
fn status_list(statuses: &[StepStatus]) -> Result<Vec<&'static str>, StoreError> {
    Ok(statuses.iter().map(|s| s.as_str()).collect())
}
