//! The embedded store: SQLite through sqlx, in one file (`sqlite://PATH`) or in memory
//! (`sqlite::memory:`, for tests).
//!
//! Timestamps are stored as fixed-format RFC 3339 text ([`chain::canonical_time`]: UTC,
//! six fraction digits, `Z`), so comparing the text compares the instants and the audit
//! log hashes exactly what it stores. Every transaction that reads before it writes begins
//! with `BEGIN IMMEDIATE`: SQLite then takes the write lock up front (waiting up to the busy
//! timeout) instead of failing when a read transaction tries to upgrade. Single statements
//! run on their own (autocommit), which SQLite also starts as a write.
//!
//! The statements are [`super::sql`]'s; this module is SQLite's dialect of them and its
//! connection.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
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

/// The SQLite schema (`migrations/sqlite`), embedded.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

/// How long a writer waits for another connection's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections of a file database; SQLite has one writer at a time anyway.
const MAX_CONNECTIONS: u32 = 8;

sql_store! {
    store: SqliteStore,
    db: Sqlite,
    pool: SqlitePool,
    row: SqliteRow,
    backend: "sqlite",
    // `BEGIN IMMEDIATE` holds the database's one write lock already.
    for_update: "",
    // One writer at a time: nobody else can hold a row.
    skip_locked: "",
    one_of_v: "IN (SELECT value FROM json_each(v_from))",
    // No data-modifying WITH: the head moves in its own statement.
    head_in_insert: false,
    // A write transaction holds the whole database.
    concurrent_groups: 1,
}

impl SqliteStore {
    /// Opens `sqlite://PATH` (creating the file and its folder) or `sqlite::memory:`, and
    /// applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Unavailable(format!("invalid SQLite URL `{url}`: {e}").into())
            })?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            // Each connection to `:memory:` would be a database of its own (sqlx names it
            // with shared cache, but shared-cache locking ignores the busy timeout): one
            // connection, never closed while the pool lives, keeps it one database.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(opts)
                .await
        } else {
            if let Some(dir) = opts.get_filename().parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StoreError::Unavailable(
                            format!("cannot create the folder {}: {e}", dir.display()).into(),
                        )
                    })?;
                }
            }
            SqlitePoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .connect_with(
                    opts.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Full),
                )
                .await
        }
        .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let store = SqliteStore::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }
}

// ---- the dialect ----

const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";
/// In WAL mode a read transaction sees one snapshot from its first read on.
const BEGIN_SNAPSHOT: &str = "BEGIN";

fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::error::ErrorKind;
    match e {
        sqlx::Error::Database(d) => {
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), extended codes included: another
            // writer held the lock past the busy timeout.
            let code = d.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            if matches!(code & 0xff, 5 | 6) {
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
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed) => StoreError::Unavailable(Box::new(e)),
        e => StoreError::Backend(Box::new(e)),
    }
}

/// The stored form of an instant (microseconds; sorts like the instant).
fn ts(at: DateTime<Utc>) -> String {
    chain::canonical_time(at)
}

fn parse_ts(name: &str, s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(name, e))
}

fn ts_col(row: &SqliteRow, name: &str) -> Result<DateTime<Utc>, StoreError> {
    let text: String = row.try_get(name).map_err(|e| corrupt(name, e))?;
    parse_ts(name, &text)
}

fn opt_ts_col(row: &SqliteRow, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let text: Option<String> = row.try_get(name).map_err(|e| corrupt(name, e))?;
    text.map(|s| parse_ts(name, &s)).transpose()
}

/// A list of statuses, bound as a JSON array (read back with `json_each`).
fn status_list(statuses: &[StepStatus]) -> Result<String, StoreError> {
    serde_json::to_string(&statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        .map_err(|e| StoreError::Backend(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;

    /// A store in a fresh file (kept while the folder lives).
    async fn store_in(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        SqliteStore::connect(&url).await.unwrap()
    }

    fn entry(request_id: Option<Uuid>) -> NewAuditEntry {
        NewAuditEntry {
            request_id,
            actor: "engine".into(),
            event: AuditEvent::Received,
            details: serde_json::json!({}),
        }
    }

    /// A group does not wait for ever on a group before it that never takes the chain's
    /// head (the two may wait on each other's rows): after [`HEAD_TURN_WAIT`] it goes ahead,
    /// and its rows name the entries where they really went.
    #[tokio::test]
    async fn a_group_waits_for_the_head_only_so_long() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir).await;
        // A group before it, promised three entries, that never gets to the head.
        let stuck = store.head.lock().unwrap().begin(3);
        let id = Uuid::now_v7();
        let write = GroupWrite::Create {
            request: Box::new(NewRequest {
                id,
                trace_id: "t".into(),
                text: "x".into(),
                requester: "alice".into(),
                submitted_by: "token:alice".into(),
                dry_run: false,
            }),
            audit: vec![entry(Some(id))],
        };
        let started = std::time::Instant::now();
        let slots = tokio::time::timeout(Duration::from_secs(5), store.commit_group(&[write]))
            .await
            .expect("the group waited for ever")
            .unwrap();
        assert!(slots[0].is_ok());
        assert!(started.elapsed() >= HEAD_TURN_WAIT);
        // Its base assumed the stuck group's entries first; it went first, so it was
        // corrected to the first entry of the chain.
        let seq: i64 = sqlx::query_scalar("SELECT audit_seq FROM tasks WHERE id = ?")
            .bind(id)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(seq, 1);
        store.head.lock().unwrap().ended(3, stuck.1, None);
        assert!(store.verify_audit().await.unwrap().ok);
    }

    /// A group whose caller stops waiting midway (its future dropped) leaves the line and
    /// takes back its promised entries: the groups after it neither wait for it nor assume
    /// its entries.
    #[tokio::test]
    async fn a_dropped_group_leaves_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir).await;
        let write = GroupWrite::Audit(vec![entry(None), entry(None)]);
        // A group before it that has not reached the head, so it cannot end at once.
        let before = store.head.lock().unwrap().begin(3);
        {
            let group = store.commit_group(std::slice::from_ref(&write));
            tokio::pin!(group);
            // Polled once (it begins, and waits), then dropped.
            assert!(futures::poll!(group.as_mut()).is_pending());
            store.head.lock().unwrap().passed(before.1);
            assert!(!store.head.lock().unwrap().first_in_line(u64::MAX));
        }
        store.head.lock().unwrap().ended(3, before.1, None);
        let mut head = store.head.lock().unwrap();
        assert!(
            head.first_in_line(u64::MAX),
            "the dropped group is still in line"
        );
        assert_eq!(
            head.begin(1).0,
            0,
            "the dropped group's entries are still promised"
        );
    }
}
